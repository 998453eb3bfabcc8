"""`LLM`: the offline Python API, shaped like vLLM's."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from tqdm.auto import tqdm

from membound.config import EngineConfig
from membound.engine.llm_engine import LLMEngine
from membound.errors import InvalidRequestError
from membound.outputs import RequestOutput
from membound.sampling_params import RequestOutputKind, SamplingParams

Prompt = str | list[int]


class LLM:
    """Load a model once, then `generate` or `chat` in batches.

    >>> llm = LLM()  # the embedded SmolLM2-135M-Instruct
    >>> llm.generate("The capital of France is", SamplingParams(temperature=0))[0].outputs[0].text
    """

    def __init__(self, model: str | None = None, **engine_args) -> None:
        # Offline, nobody reads tokens as they come: prompts go in at the full step budget
        # (the server keeps the device's default cap, so streams keep their token rate).
        engine_args.setdefault("long_prefill_token_threshold", 0)
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        A prompt is a string or a list of token ids.
        """
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise InvalidRequestError(
                    f"got {len(prompts)} prompts but {len(params)} sampling params; give one, or one per prompt"
                )
        return self._run(prompts, params, use_tqdm)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix (e.g. between benchmark runs)."""
        self.engine.reset_prefix_cache()

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        if self.tokenizer is None:
            raise InvalidRequestError("chat needs a tokenizer; this engine was built without one")
        convs = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.tokenizer.apply_chat_template(c) for c in convs]
        return self._run(prompts, [sampling_params or SamplingParams()] * len(prompts), use_tqdm)

    def _run(self, prompts: list[Prompt], params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        ids = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                rid = f"llm-{next(self._ids)}"
                if isinstance(p, SamplingParams) and p.output_kind is not RequestOutputKind.FINAL_ONLY:
                    p = dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)  # no per-step outputs
                self.engine.add_request(rid, prompt, p)
                ids.append(rid)
        except Exception:
            for rid in ids:  # an invalid prompt cancels the whole call, leaving nothing queued
                self.engine.abort_request(rid)
            raise
        final: dict[str, RequestOutput] = {}
        wanted = set(ids)
        try:
            with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
                while len(final) < len(ids):
                    for out in self.engine.step():
                        if out.finished and out.request_id in wanted:
                            final[out.request_id] = out
                            bar.update(1)
        finally:
            for rid in wanted - final.keys():  # interrupted: nothing stays queued for the next call
                self.engine.abort_request(rid)
        return [final[rid] for rid in ids]
