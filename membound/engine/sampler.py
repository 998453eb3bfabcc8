"""Turns logits into next tokens on the device the model runs on.

Order (as vLLM): penalties on the logits, then temperature, then top-k / top-p /
min-p truncation, then a draw. Draws invert each row's CDF at one uniform
(`rejection_sampler.draw`; an exponential race over the vocabulary cost ~1 ms a row on
CPU), taken from the request's own generator when it has a seed: a request with a seed
samples the same tokens in any batch.
Only the sampled ids (and logprobs when asked) leave the device.
"""

from __future__ import annotations

import dataclasses

import torch

from membound.engine.rejection_sampler import draw, rejection_sample
from membound.engine.structured import allowed_tokens
from membound.engine.transfer import to_device
from membound.sampling_params import SamplingParams


@dataclasses.dataclass
class SamplingBatch:
    """Per-row sampling settings for one step, as device tensors."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    temperature: torch.Tensor  # [B] fp32
    top_k: torch.Tensor  # [B] int64, vocab size when off
    top_p: torch.Tensor  # [B] fp32
    min_p: torch.Tensor  # [B] fp32
    all_greedy: bool
    needs_truncation: bool
    max_logprobs: int | None  # None: no row asked for logprobs
    penalties: Penalties | None  # or any object with apply(logits) and record(ids)
    banned: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, token ids) forced to -inf
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows, token ids, added) logit_bias
    # Structured outputs: (rows, token bitmask [R, V / 32]); the mask is filled just before sampling
    # (`InputBatch.fill_grammar_mask`), from the matchers of the rows in `constrained` (host).
    grammar: tuple[torch.Tensor, torch.Tensor | None] | None = None
    constrained: tuple[int, ...] = ()
    # Speculative decoding: (first row, drafts) per sequence verifying drafts; its rows are
    # consecutive, one per draft and one after them (`verify_on_device`).
    spec: tuple[tuple[int, int], ...] = ()

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        token_ids: list[list[int]],
        num_prompt_tokens: list[int],
        vocab_size: int,
        device: torch.device,
        banned: list[list[int]] | None = None,
    ) -> SamplingBatch:
        def t(values, dtype=torch.float32):
            return to_device(values, dtype, device)

        top_k = [p.top_k if p.top_k > 0 else vocab_size for p in params]
        pairs = [(row, tok) for row, toks in enumerate(banned or []) for tok in toks if tok < vocab_size]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            params=params,
            generators=generators,
            temperature=t([p.temperature for p in params]),
            top_k=t(top_k, torch.int64),
            top_p=t([p.top_p for p in params]),
            min_p=t([p.min_p for p in params]),
            all_greedy=all(p.greedy for p in params),
            needs_truncation=any(
                not p.greedy and (p.top_p < 1 or p.min_p > 0 or 0 < p.top_k < vocab_size) for p in params
            ),
            max_logprobs=max(asked) if asked else None,
            penalties=Penalties.build(params, token_ids, num_prompt_tokens, vocab_size, device)
            if any(p.uses_penalties for p in params)
            else None,
            banned=(t([r for r, _ in pairs], torch.int64), t([c for _, c in pairs], torch.int64)) if pairs else None,
            bias=logit_bias_rows(params, range(len(params)), vocab_size, device),
        )


def logit_bias_rows(params: list[SamplingParams], rows, vocab_size: int, device: torch.device):
    """(rows, token ids, biases) device tensors of the rows' logit_bias, or None (ids past the
    vocabulary never reach here: the engine refuses them)."""
    triples = [(r, t, float(b)) for r in rows for t, b in (params[r].logit_bias or {}).items() if t < vocab_size]
    if not triples:
        return None
    rows_t = to_device([x[0] for x in triples], torch.int64, device)
    ids_t = to_device([x[1] for x in triples], torch.int64, device)
    return rows_t, ids_t, to_device([x[2] for x in triples], torch.float32, device)


@dataclasses.dataclass
class Penalties:
    repetition: torch.Tensor  # [B, 1]
    presence: torch.Tensor  # [B, 1]
    frequency: torch.Tensor  # [B, 1]
    output_counts: torch.Tensor  # [B, V] how often each token was generated
    seen: torch.Tensor  # [B, V] bool: in the prompt or the output

    @classmethod
    def build(cls, params, token_ids, num_prompt_tokens, vocab_size, device) -> Penalties:
        b = len(params)
        width = max(len(ids) for ids in token_ids)
        # Pad with an id past the vocabulary, into a spare column dropped below.
        padded = torch.full((b, width), vocab_size, dtype=torch.int64)
        is_output = torch.zeros((b, width), dtype=torch.float32)
        for i, ids in enumerate(token_ids):
            padded[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
            is_output[i, num_prompt_tokens[i] : len(ids)] = 1
        padded, is_output = to_device(padded, torch.int64, device), to_device(is_output, torch.float32, device)
        counts = torch.zeros((b, vocab_size + 1), dtype=torch.float32, device=device)
        counts.scatter_add_(1, padded, is_output)
        seen = torch.zeros((b, vocab_size + 1), dtype=torch.bool, device=device)
        seen.scatter_(1, padded, True)

        def col(values):
            return to_device(values, torch.float32, device)[:, None]

        return cls(
            repetition=col([p.repetition_penalty for p in params]),
            presence=col([p.presence_penalty for p in params]),
            frequency=col([p.frequency_penalty for p in params]),
            output_counts=counts[:, :vocab_size],
            seen=seen[:, :vocab_size],
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return apply_penalties(logits, self.seen, self.output_counts, self.repetition, self.presence, self.frequency)

    def record(self, ids: torch.Tensor) -> None:
        """Built from the token lists each step: nothing to carry over."""


def apply_penalties(
    logits: torch.Tensor,  # [B, V]
    seen: torch.Tensor,  # [B, V] bool: in the prompt or the output
    output_counts: torch.Tensor,  # [B, V] how often each token was generated
    repetition: torch.Tensor,  # [B, 1]
    presence: torch.Tensor,  # [B, 1]
    frequency: torch.Tensor,  # [B, 1]
) -> torch.Tensor:
    # Repetition (CTRL / HF): divide positive logits, multiply negative ones.
    rep = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, rep, logits)
    # Presence / frequency (OpenAI): subtract per output occurrence.
    logits = logits - frequency * output_counts
    return logits - presence * (output_counts > 0).float()


@dataclasses.dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float] | None  # of the sampled token, raw model distribution
    ranks: list[int] | None  # of the sampled token (1: the most likely)
    top_ids: list[list[int]] | None
    top_logprobs: list[list[float]] | None
    emitted: list[int] | None = None  # speculative rows: at an entry's first row, tokens it emits


def truncate(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k, outside the top-p nucleus, or below min_p x p_max."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Keep a token while the mass before it is below top_p (the first always survives).
    mass_before = probs.cumsum(dim=-1) - probs
    # top_p = 1 keeps everything: the fp32 cumsum saturates at 1 before the tail, which must not drop it.
    drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
    drop |= probs < min_p[:, None] * probs[:, :1]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample(logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None) -> SamplerOutput:
    """logits: [B, V] fp32 for the rows that sample this step."""
    return unpack(sample_on_device(logits, batch, generator).cpu(), batch)


def sample_on_device(logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None) -> torch.Tensor:
    """Everything on the device; returns one small tensor for the single transfer to the host:
    the ids [B] (int64), or with logprobs [B, 3 + 2k] fp32 (id, its logprob, its rank, top-k values,
    top-k ids)."""
    raw_logprobs = logits.log_softmax(dim=-1) if batch.max_logprobs is not None else None
    if batch.bias is not None:  # before every other setting (as OpenAI and vLLM apply it)
        logits = logits.index_put(batch.bias[:2], batch.bias[2], accumulate=True)
    if batch.banned is not None:
        logits = logits.index_put(batch.banned, logits.new_full((), float("-inf")))
    if batch.penalties is not None:
        logits = batch.penalties.apply(logits)
    if batch.grammar is not None:  # only what the grammar allows next
        rows, mask = batch.grammar
        allowed = allowed_tokens(mask, logits.shape[1])
        logits = logits.index_put((rows,), logits[rows].masked_fill(~allowed, float("-inf")))
    greedy_ids = logits.argmax(dim=-1)
    if batch.all_greedy:
        ids = greedy_ids
    else:
        temp = torch.where(batch.temperature > 0, batch.temperature, torch.ones_like(batch.temperature))
        scaled = logits / temp[:, None]
        if batch.needs_truncation:
            scaled = truncate(scaled, batch.top_k, batch.top_p, batch.min_p)
        probs = scaled.softmax(dim=-1)
        drawn = draw(probs, generator, batch.generators)
        ids = torch.where(batch.temperature > 0, drawn, greedy_ids)

    if batch.penalties is not None:
        batch.penalties.record(ids)  # counts kept on the device see this token at the next step
    if raw_logprobs is None:
        return ids
    chosen, rank, top_vals, top_ids = score_tokens(raw_logprobs, ids, max(batch.max_logprobs, 1), normalized=True)
    # ids and ranks travel as fp32 beside the logprobs: exact, vocabularies being far below 2**24.
    return torch.cat([ids[:, None].float(), chosen[:, None], rank[:, None].float(), top_vals, top_ids.float()], dim=1)


def verify_on_device(
    logits: torch.Tensor, row_inputs: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative rows: for each `batch.spec` entry (first row r, k drafts), rows r..r+k score the
    drafts (row r + j's input is draft j - 1) and the position after them. Returns (tokens [R]: at
    an entry's rows, what it emits in order; emitted [R]: at its first row, how many; 0 elsewhere).
    The target distribution is the row's own (temperature, top-k/p, min-p; greedy: its argmax):
    speculating rows have no other settings (`engine/speculator.py`)."""
    tokens = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    emitted = torch.zeros_like(tokens)
    by_k: dict[int, list[int]] = {}
    for r, k in batch.spec:
        by_k.setdefault(k, []).append(r)
    for k, firsts in by_k.items():
        starts = torch.tensor(firsts, device=logits.device)
        rows = (starts[:, None] + torch.arange(k + 1, device=logits.device)).reshape(-1)
        drafts = row_inputs[rows].view(len(firsts), k + 1)[:, 1:]
        if batch.all_greedy:  # accepted while the argmax matches; then the argmax itself
            out = logits[rows].argmax(dim=-1).view(len(firsts), k + 1)
            match = torch.cat([out[:, :k] == drafts, torch.zeros_like(drafts[:, :1], dtype=torch.bool)], dim=1)
            n = match.int().cumprod(dim=1).sum(dim=1) + 1
        else:
            probs = _target_probs(logits[rows], batch, rows).view(len(firsts), k + 1, -1)
            out, n = rejection_sample(probs, drafts, None, generator)
        tokens[rows] = out.reshape(-1)
        emitted[starts] = n
    return tokens, emitted


def _target_probs(logits: torch.Tensor, batch: SamplingBatch, rows: torch.Tensor) -> torch.Tensor:
    """The distribution each row samples from: one-hot at the argmax where greedy."""
    temperature = batch.temperature[rows]
    greedy = torch.zeros_like(logits, dtype=torch.float32).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    if batch.all_greedy:
        return greedy
    temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits.float() / temp[:, None]
    if batch.needs_truncation:
        scaled = truncate(scaled, batch.top_k[rows], batch.top_p[rows], batch.min_p[rows])
    return torch.where((temperature > 0)[:, None], scaled.softmax(dim=-1), greedy)


def score_tokens(
    logits: torch.Tensor, targets: torch.Tensor, k: int, normalized: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw-distribution logprobs of `targets` [R] under `logits` [R, V] (already log-softmaxed when
    `normalized`), their ranks (1: the most likely), and each row's top-k (values, ids): what
    logprobs report, for the sampled token and for prompt tokens alike."""
    raw = logits if normalized else logits.float().log_softmax(dim=-1)
    top = raw.topk(k, dim=-1) if k else None
    chosen = raw.gather(1, targets[:, None])[:, 0]
    rank = (raw >= chosen[:, None]).sum(dim=-1)  # tied tokens count ahead of it, as vLLM ranks
    empty = raw.new_zeros(raw.shape[0], 0)
    return chosen, rank, (top.values if top else empty), (top.indices if top else empty.long())


def unpack(host: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """The host copy of `sample_on_device`'s result as Python lists (and, after verification, the
    emitted counts in a last column)."""
    emitted = None
    if batch.spec:
        emitted = host[:, -1].long().tolist()
        host = host[:, :-1] if batch.max_logprobs is not None else host[:, 0]
    if batch.max_logprobs is None:
        return SamplerOutput(host.tolist(), None, None, None, None, emitted)
    k = max(batch.max_logprobs, 1)
    packed = host.tolist()
    return SamplerOutput(
        emitted=emitted,
        token_ids=[int(row[0]) for row in packed],
        logprobs=[row[1] for row in packed],
        ranks=[int(row[2]) for row in packed],
        top_ids=[[int(x) for x in row[3 + k :]] for row in packed],
        top_logprobs=[row[3 : 3 + k] for row in packed],
    )
