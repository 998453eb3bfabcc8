"""Prompt-lookup drafts: the tokens that followed the last n tokens where they occurred before.

No second model: a sequence that repeats its own text (a summary quoting its source, code
edited with a rename, a list continued) is drafted from its own prompt and output. The longest
n in [min_n, max_n] whose suffix occurred earlier wins, its most recent occurrence first.
"""

from __future__ import annotations

import numpy as np


def propose_ngram(tokens: list[int] | np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k draft tokens for the sequence `tokens` (empty when its suffix never occurred)."""
    t = np.asarray(tokens, dtype=np.int64)
    length = len(t)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = t[length - n :]
        # Windows of n tokens that end before the suffix itself begins to overlap its last token.
        windows = np.lib.stride_tricks.sliding_window_view(t[: length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n  # what followed the most recent occurrence
            return t[start : start + k].tolist()
    return []
