"""Prompt-lookup drafts: the tokens that followed the last n tokens where they occurred before.

No second model: a sequence that repeats its own text (a summary quoting its source, code
edited with a rename, a list continued) is drafted from its own prompt and output. The longest
n in [min_n, max_n] whose suffix occurred earlier wins, its most recent occurrence first.

Cost per call: one pass comparing the sequence with its last token (candidates), then n - 1
comparisons on the candidates only; the sequence is a numpy array the caller keeps and extends
(`TokenBuffer`), so no per-step copy of a long context.
"""

from __future__ import annotations

import numpy as np


class TokenBuffer:
    """A sequence's tokens as a growing numpy array (append-only, as a request's tokens are)."""

    def __init__(self) -> None:
        self._buf = np.zeros(0, dtype=np.int64)
        self._n = 0

    def sync(self, tokens: list[int]) -> np.ndarray:
        """The array of `tokens`, copying only what was appended since the last call."""
        n = len(tokens)
        if n > len(self._buf):
            grown = np.zeros(max(n, 2 * len(self._buf), 64), dtype=np.int64)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        if n > self._n:
            self._buf[self._n : n] = tokens[self._n : n]
        self._n = n
        return self._buf[:n]


def propose_ngram(tokens: list[int] | np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k draft tokens for the sequence `tokens` (empty when its suffix never occurred)."""
    t = np.asarray(tokens, dtype=np.int64)
    length = len(t)
    if length < 2 or k <= 0:
        return []
    # Earlier places of the last token (never the last position itself: something must follow).
    cand = np.flatnonzero(t[: length - 1] == t[length - 1])
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        c = cand[cand >= n - 1]
        for j in range(1, n):  # the n - 1 tokens before each candidate match the suffix's too
            if not len(c):
                break
            c = c[t[c - j] == t[length - 1 - j]]
        if len(c):
            start = int(c[-1]) + 1  # what followed the most recent occurrence
            return t[start : start + k].tolist()
    return []
