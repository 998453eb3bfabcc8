"""Structured outputs: a grammar (JSON schema, any JSON, regex, choice, EBNF) constrains each token.

xgrammar compiles the grammar once per request kind (its compiler caches) and gives each request a
matcher. Before a constrained row samples, its matcher fills the row of a token bitmask (host);
the sampler masks the logits with it on the device; the sampled token then advances the matcher,
which ends the request when the grammar is complete.
"""

from __future__ import annotations

import json

import torch

from membound.errors import InvalidRequestError
from membound.sampling_params import StructuredOutputsParams


class StructuredOutputs:
    """One per engine: xgrammar's view of the vocabulary and its compiler (with its cache)."""

    def __init__(self, hf_tokenizer, vocab_size: int) -> None:
        try:
            import xgrammar
        except ImportError as e:  # a dependency, but a broken install should still serve the rest
            raise InvalidRequestError("structured outputs need the xgrammar package: pip install xgrammar") from e
        self._xgr = xgrammar
        self.vocab_size = vocab_size
        info = xgrammar.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size)
        # Bounded cache: every distinct schema a client sends would otherwise stay (~170 KB each).
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_limit_bytes=256 << 20)

    def matcher(self, spec: StructuredOutputsParams):
        """A fresh matcher for this request; a grammar xgrammar cannot compile is the request's error."""
        c = self._compiler
        try:
            # No free whitespace (fixed ", " and ": " separators): a weak model cannot pad forever.
            if spec.json is not None:
                schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
                compiled = c.compile_json_schema(schema, any_whitespace=False, strict_mode=True)
            elif spec.json_object:
                compiled = c.compile_json_schema('{"type": "object"}', any_whitespace=False)
            elif spec.regex is not None:
                compiled = c.compile_regex(spec.regex)
            elif spec.choice is not None:
                # Each choice as a literal: a regex alternation of escaped strings.
                compiled = c.compile_regex("|".join(_regex_literal(x) for x in spec.choice))
            else:
                compiled = c.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError, TypeError) as e:
            raise InvalidRequestError(
                f"structured_outputs: the {spec.kind} could not be compiled: {e}", param="structured_outputs"
            ) from None
        return self._xgr.GrammarMatcher(compiled)


def token_bitmask(matchers: list, vocab_size: int) -> torch.Tensor:
    """[len(matchers), ceil(V / 32)] int32 (host): bit j of row i set where matcher i allows token j
    (every bit, for a None matcher)."""
    import xgrammar  # present: the matchers came from it

    mask = xgrammar.allocate_token_bitmask(len(matchers), vocab_size)
    for i, m in enumerate(matchers):
        if m is not None:
            m.fill_next_token_bitmask(mask, i)
    return mask


def _regex_literal(s: str) -> str:
    return "".join("\\" + ch if ch in r"\^$.|?*+()[]{}/" else ch for ch in s)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The bitmask unpacked to bool [R, vocab_size] (on the bitmask's device)."""
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    return ((bitmask[:, :, None] >> bits) & 1).view(bitmask.shape[0], -1)[:, :vocab_size].bool()
