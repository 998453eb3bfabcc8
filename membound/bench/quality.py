"""`membound bench quality`: what each weight format costs, measured against full precision.

The full-precision model writes text once (fixed seed, sampled); every variant then scores that
same text, and we report the mean KL divergence of its next-token distributions from the
reference's and how often their top-1 tokens agree, as llama.cpp's perplexity tool does. No
external corpus is needed.
"""

from __future__ import annotations

import torch

from membound.attention.base import AttentionMetadata
from membound.engine.kv_cache import KVCacheSpec, allocate_kv_cache, blocks_needed
from membound.engine.llm_engine import LLMEngine
from membound.sampling_params import SamplingParams


@torch.inference_mode()
def sequence_logprobs(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    """Log-probabilities at every position of one sequence, [len(ids), vocab], in one prefill."""
    n, bs = len(ids), engine.config.block_size
    nb = blocks_needed(n, bs)
    spec = KVCacheSpec(
        engine.kv_spec.num_layers, engine.kv_spec.num_kv_heads, engine.kv_spec.head_dim, bs, engine.kv_spec.dtype
    )
    caches = allocate_kv_cache(spec, nb, engine.device)
    dev = engine.device
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device=dev),
        block_tables=torch.arange(nb, dtype=torch.int32, device=dev)[None],
        seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
        num_decodes=0,
        seq_lens_host=(n,),
        query_start_loc_host=(0, n),
    )
    hidden = engine.model(torch.tensor(ids, device=dev), torch.arange(n, device=dev), caches, meta)
    return torch.log_softmax(engine.model.compute_logits(hidden).float(), -1).cpu()


def reference_text(engine: LLMEngine, tokens: int, seed: int) -> list[int]:
    """A prompt of a few fixed tokens, continued by the reference model itself."""
    vocab = engine.model_config.vocab_size
    prompt = [(7919 * (i + 1)) % vocab for i in range(8)]
    engine.add_request(
        "quality", prompt, SamplingParams(temperature=0.8, seed=seed, max_tokens=tokens, ignore_eos=True)
    )
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
    return prompt + out.outputs[0].token_ids


def compare(reference: torch.Tensor, variant: torch.Tensor) -> dict:
    kl = (reference.exp() * (reference - variant)).sum(-1)
    return {
        "mean_kl": kl.mean().item(),
        "max_kl": kl.max().item(),
        "top1_agreement": (reference.argmax(-1) == variant.argmax(-1)).float().mean().item(),
    }


def run(make_engine, formats: list[str], tokens: int, seed: int) -> dict:
    """`make_engine(quantization)` builds an engine; None is the full-precision reference."""
    ref_engine = make_engine(None)
    ids = reference_text(ref_engine, tokens, seed)
    ref = sequence_logprobs(ref_engine, ids)
    from membound.bench.common import weight_bytes_per_step

    rows = [{"format": "reference", "weight_bytes_per_step": weight_bytes_per_step(ref_engine), **compare(ref, ref)}]
    record_engine = ref_engine
    del ref_engine
    for fmt in formats:
        eng = make_engine(fmt)
        rows.append({"format": fmt, "weight_bytes_per_step": weight_bytes_per_step(eng),
                     **compare(ref, sequence_logprobs(eng, ids))})  # fmt: skip
        del eng
    return {"tokens": len(ids), "seed": seed, "rows": rows, "_engine": record_engine}
