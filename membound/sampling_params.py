"""Per-request sampling settings, validated when the request is made."""

from __future__ import annotations

import dataclasses
import enum
import reprlib

from membound.errors import InvalidRequestError

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 64  # OpenAI allows 4
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrain the output (vLLM's names): exactly one of a JSON schema (`json`, a dict or its JSON
    text), any JSON object (`json_object`), a regex, a choice of strings, or an EBNF grammar."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object is True else []
        if len(given) != 1:
            raise InvalidRequestError(
                "structured_outputs takes exactly one of json, json_object, regex, choice, grammar; "
                f"got {', '.join(given) or 'none'}",
                param="structured_outputs",
            )
        if self.json is not None and not isinstance(self.json, dict | str):
            raise InvalidRequestError(
                "structured_outputs.json must be a JSON schema (an object)", param="structured_outputs"
            )
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise InvalidRequestError(
                    f"structured_outputs.{name} must be a non-empty string", param="structured_outputs"
                )
        if self.choice is not None and (
            not isinstance(self.choice, list)
            or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise InvalidRequestError(
                "structured_outputs.choice must be a non-empty list of non-empty strings", param="structured_outputs"
            )
        if self.json_object not in (True, False):
            raise InvalidRequestError(
                "structured_outputs.json_object must be true or false", param="structured_outputs"
            )

    @property
    def kind(self) -> str:
        if self.json is not None:
            return "JSON schema"
        return (
            "json_object grammar"
            if self.json_object
            else ("regex" if self.regex else ("choice" if self.choice else "grammar"))
        )


def _short(value) -> str:
    """repr cut to a line (errors only)."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = 80
    r.maxlist = r.maxdict = 8
    return r.repr(value)


class RequestOutputKind(enum.Enum):
    """What a request's outputs carry (as vLLM): everything so far at every step, only what each
    step added (streams), or one output when it finishes (offline generate)."""

    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL_ONLY = "final_only"


@dataclasses.dataclass
class SamplingParams:
    """How to pick each next token and when to stop; names follow vLLM / OpenAI.

    temperature 0 means greedy. top_k 0 or -1 disables top-k; top_p 1 and min_p 0
    disable theirs. `logprobs=N` returns the sampled token's logprob and the top N
    (0 = only the sampled token), computed from the model's raw distribution.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    # Logprob of every prompt token after the first (and its top-N alternatives), from the model's raw
    # distribution: what scoring (lm-eval's loglikelihood) reads. The prompt skips the prefix cache.
    prompt_logprobs: int | None = None
    # token id -> added to its logit before every other setting (OpenAI's range: [-100, 100]).
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is not None and not isinstance(self.logit_bias, dict):
            raise InvalidRequestError(
                f"logit_bias must be a dict of token id -> bias, got {_short(self.logit_bias)}", param="logit_bias"
            )
        self.logit_bias = dict(self.logit_bias) if self.logit_bias else None
        self._check()

    def _check(self) -> None:
        def bad(name: str, allowed: str) -> InvalidRequestError:
            # Shortened: the value may be a client's 30 MB list, which the error must not echo back.
            return InvalidRequestError(f"{name} must be {allowed}, got {_short(getattr(self, name))}", param=name)

        def number(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
                raise bad(name, "a number")
            return v

        if not isinstance(self.n, int) or self.n != 1:
            raise bad("n", "1 (several completions per request are not supported yet)")
        if number("temperature") < 0 or self.temperature > 100:
            raise bad("temperature", "in [0, 100] (0 = greedy)")
        if not 0 < number("top_p") <= 1:
            raise bad("top_p", "in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "an integer >= 1, or 0 / -1 to disable")
        if not 0 <= number("min_p") <= 1:
            raise bad("min_p", "in [0, 1]")
        if not 0 < number("repetition_penalty") <= 10:
            raise bad("repetition_penalty", "in (0, 10] (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(name) <= 2:
                raise bad(name, "in [-2, 2]")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63
        ):
            raise bad("seed", "an integer in [0, 2**63) or None")
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise bad("max_tokens", "an integer >= 1, or None for up to max_model_len")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})", param="min_tokens"
            )
        # Bounded: every generated token is checked against each of them on the engine thread.
        if len(self.stop) > MAX_STOP_STRINGS or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop
        ):
            raise bad(
                "stop",
                f"a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings of at most "
                f"{MAX_STOP_CHARS} characters",
            )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise bad("stop_token_ids", f"a list of at most {MAX_STOP_TOKEN_IDS} non-negative token ids")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise bad("structured_outputs", "a StructuredOutputsParams or None")
        if self.structured_outputs is not None and self.min_tokens:
            # min_tokens bans EOS, which a complete grammar leaves as the only choice.
            raise InvalidRequestError(
                "min_tokens cannot be combined with structured_outputs: the grammar decides where the output ends",
                param="min_tokens",
            )
        if not isinstance(self.output_kind, RequestOutputKind):
            raise bad("output_kind", "a RequestOutputKind")
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool)
            or not isinstance(self.logprobs, int)
            or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise bad("logprobs", f"an integer in [0, {MAX_LOGPROBS}] or None")
        if self.prompt_logprobs is not None and (
            isinstance(self.prompt_logprobs, bool)
            or not isinstance(self.prompt_logprobs, int)
            or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            raise bad("prompt_logprobs", f"an integer in [0, {MAX_LOGPROBS}] or None")
        if self.logit_bias is not None:
            if len(self.logit_bias) > MAX_LOGIT_BIAS or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.logit_bias
            ):
                raise bad("logit_bias", f"a dict of at most {MAX_LOGIT_BIAS} non-negative token ids -> bias")
            for v in self.logit_bias.values():
                if isinstance(v, bool) or not isinstance(v, int | float) or not -100 <= v <= 100:
                    raise bad("logit_bias", "a dict of token id -> a bias in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
