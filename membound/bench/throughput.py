"""`membound bench throughput`: an offline workload, all requests submitted at once.

Random lengths by default (256 requests, input and output uniform in 100-1024 tokens, as
nano-vllm publishes), or a JSONL file ({"prompt": text or ids, "output_len": n} per line)
or a ShareGPT JSON file (first human turn as the prompt, the reply's length as output).
`--compare hf` runs the same workload through HF transformers on the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import random
import time

import torch
from tqdm.auto import tqdm

from membound.engine.llm_engine import LLMEngine
from membound.errors import ConfigError
from membound.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class WorkItem:
    prompt: list[int]
    output_len: int


def random_workload(
    n: int, input_range: tuple[int, int], output_range: tuple[int, int], vocab: int, seed: int = 0
) -> list[WorkItem]:
    rng = random.Random(seed)
    return [
        WorkItem([rng.randrange(1, vocab) for _ in range(rng.randint(*input_range))], rng.randint(*output_range))
        for _ in range(n)
    ]


def needs_tokenizer(path: str | None) -> bool:
    """Whether a dataset holds text (ShareGPT always does; JSONL when any prompt is a string)."""
    if not path or not pathlib.Path(path).is_file():
        return False
    text = pathlib.Path(path).read_text()
    if text.lstrip().startswith("["):
        return True
    for line in text.splitlines():
        try:
            if isinstance(json.loads(line).get("prompt"), str):
                return True
        except (ValueError, AttributeError):
            continue  # reported with its line number when the workload is read
    return False


def file_workload(path: str, engine: LLMEngine, n: int | None, default_output: int = 128) -> list[WorkItem]:
    tok = engine.tokenizer
    p = pathlib.Path(path)
    if not p.is_file():
        raise ConfigError(f"dataset {path!r} not found")
    text = p.read_text()
    items: list[WorkItem] = []

    def ids(x) -> list[int]:
        if isinstance(x, list):
            return [int(t) for t in x]
        if tok is None:
            raise ConfigError("text prompts need a tokenizer; this model has none (give token ids)")
        return tok.encode(x)

    if text.lstrip().startswith("["):  # ShareGPT: [{"conversations": [{"from": "human", "value": ...}, ...]}]
        for entry in json.loads(text):
            turns = entry.get("conversations") or []
            if len(turns) < 2:
                continue
            items.append(WorkItem(ids(turns[0]["value"]), max(1, len(ids(turns[1]["value"])))))
    else:
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                items.append(
                    WorkItem(ids(row["prompt"]), int(row.get("output_len", row.get("max_tokens", default_output))))
                )
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{path} line {i + 1}: expected {{'prompt': ..., 'output_len': n}}: {e}") from e
    limit = engine.max_model_len
    items = [w for w in items if w.prompt and len(w.prompt) + w.output_len <= limit]
    if not items:
        raise ConfigError(f"{path}: no usable requests (each must fit in max_model_len {limit})")
    return items[:n] if n else items


def _summary(elapsed: float, work: list[WorkItem]) -> dict:
    prompt = sum(len(w.prompt) for w in work)
    output = sum(w.output_len for w in work)
    return {
        "elapsed_s": elapsed,
        "requests": len(work),
        "prompt_tokens": prompt,
        "output_tokens": output,
        "requests_per_s": len(work) / elapsed,
        "output_tok_s": output / elapsed,
        "total_tok_s": (prompt + output) / elapsed,
    }


def run_membound(engine: LLMEngine, work: list[WorkItem], progress: bool = True) -> dict:
    for i, w in enumerate(work):
        engine.add_request(f"tp{i}", w.prompt, SamplingParams(temperature=0, max_tokens=w.output_len, ignore_eos=True))
    done = 0
    before = engine.stats()
    t = time.perf_counter()
    with tqdm(total=len(work), desc="membound", unit="req", disable=not progress) as bar:
        while engine.has_unfinished_requests():
            finished = sum(1 for o in engine.step() if o.finished)
            done += finished
            bar.update(finished)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    out = _summary(time.perf_counter() - t, work)
    if engine.config.speculative_config is not None:
        out.update(spec_stats(before, engine.stats()))
    return out


def spec_stats(before, after) -> dict:
    """Speculative decoding over a run: drafting steps, drafts, and the mean acceptance length
    (tokens emitted per drafting step: accepted drafts + the target's own)."""
    drafts = after.spec_num_drafts - before.spec_num_drafts
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    return {
        "spec_drafting_steps": drafts,
        "spec_draft_tokens": after.spec_num_draft_tokens - before.spec_num_draft_tokens,
        "spec_accepted_tokens": accepted,
        "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
    }


@torch.inference_mode()
def run_hf(hf, work: list[WorkItem], batch_size: int, device: torch.device, progress: bool = True) -> dict:
    """HF `generate` in batches of similar prompt length, left-padded; each batch runs to its longest output."""
    order = sorted(range(len(work)), key=lambda i: len(work[i].prompt))
    t = time.perf_counter()
    with tqdm(total=len(work), desc="hf", unit="req", disable=not progress) as bar:
        for lo in range(0, len(order), batch_size):
            batch = [work[i] for i in order[lo : lo + batch_size]]
            width = max(len(w.prompt) for w in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, w in enumerate(batch):
                ids[r, width - len(w.prompt) :] = torch.tensor(w.prompt)
                mask[r, width - len(w.prompt) :] = 1
            n = max(w.output_len for w in batch)
            hf.generate(
                ids.to(device), attention_mask=mask.to(device), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
            bar.update(len(batch))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return _summary(time.perf_counter() - t, work)
