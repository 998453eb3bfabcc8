"""The OpenAI wire format: request bodies (validated by pydantic) and error bodies.

Types are checked here; ranges are checked once, by `SamplingParams`, so the HTTP and
Python APIs give the same messages. Fields OpenAI has but membound does not implement
are accepted only at their neutral value and otherwise rejected by name, never ignored.

Fields that can hold millions of items (prompts, token ids, messages) are `SkipValidation`:
the OpenAPI schema still describes them, but pydantic, which checks a list in one call that
holds the GIL (0.7 s for 3M token ids), leaves them to the request's worker thread, which
checks their lengths first and their items in Python (`checked_*`), so the event loop and
the other requests never wait on them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SkipValidation,
    StrictBool,
    StrictInt,
    ValidationError,
    model_validator,
)

from membound.errors import InvalidRequestError
from membound.sampling_params import MAX_LOGIT_BIAS, StructuredOutputsParams

MAX_TOOLS = 128  # OpenAI's limit

Number = StrictInt | float  # pydantic's float accepts ints; StrictInt keeps bools out of int fields


def validation_message(errors: list[dict], prefix: tuple = ()) -> tuple[str, str | None]:
    """pydantic's errors as one line (the first problem, and how many more) and the top-level field."""
    if not errors:
        return "the request body is invalid", None
    e = errors[0]
    loc = [str(x) for x in (*prefix, *e.get("loc", ())) if x != "body"]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if e.get("type") in ("model_attributes_type", "model_type") and not loc:
        return "the request body must be a JSON object", None
    where = ".".join(loc) or "body"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {e.get('msg', 'invalid value')}{more}", loc[0] if loc else None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class RequestBody(BaseModel):
    """Every route's body: unknown fields are ignored (as OpenAI and vLLM do), null means the default."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI lets clients send null for optional fields; null then means "the default".
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class _SamplingFields(RequestBody):
    """What both completion endpoints share."""

    model: str | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    min_p: Number | None = None
    seed: StrictInt | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    repetition_penalty: Number | None = None
    min_tokens: StrictInt = 0
    stop_token_ids: SkipValidation[list[StrictInt] | None] = None  # checked by SamplingParams
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    logit_bias: SkipValidation[dict[str, Number] | None] = None  # token id (as a string) -> bias: `checked_logit_bias`
    # vLLM's: exactly one of json (a schema), json_object, regex, choice, grammar (EBNF)
    structured_outputs: dict[str, Any] | None = None
    # OpenAI's: {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}
    response_format: dict[str, Any] | None = None
    user: str | None = None

    def checked_structured_outputs(self) -> StructuredOutputsParams | None:
        """structured_outputs or response_format as one StructuredOutputsParams (None: unconstrained)."""
        so, rf = self.structured_outputs, self.response_format
        if so is not None and rf is not None and rf.get("type") != "text":
            raise InvalidRequestError("give structured_outputs or response_format, not both", param="response_format")
        if so is not None:
            unknown = sorted(set(so) - {"json", "json_object", "regex", "choice", "grammar"})
            if unknown:
                raise InvalidRequestError(
                    f"structured_outputs has unknown fields {unknown}; "
                    "allowed: json, json_object, regex, choice, grammar",
                    param="structured_outputs",
                )
            return StructuredOutputsParams(**{k: v for k, v in so.items() if v is not None})
        if rf is None:
            return None
        kind = rf.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return StructuredOutputsParams(json_object=True)
        if kind == "json_schema":
            spec = rf.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise InvalidRequestError(
                    "response_format json_schema needs json_schema.schema, a JSON schema object",
                    param="response_format",
                )
            return StructuredOutputsParams(json=schema)
        raise InvalidRequestError(
            f"response_format.type must be text, json_object or json_schema, got {str(kind)[:40]!r}",
            param="response_format",
        )

    def checked_logit_bias(self) -> dict[int, float] | None:
        """logit_bias with its keys as token ids (JSON keys are strings); ranges are SamplingParams'."""
        b = self.logit_bias
        if not b:
            return None
        if not isinstance(b, dict) or len(b) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(
                f"logit_bias must be an object of at most {MAX_LOGIT_BIAS} token ids -> bias", param="logit_bias"
            )
        out = {}
        for k, v in b.items():
            if not (isinstance(k, str) and k.isascii() and k.isdigit()):
                raise InvalidRequestError(
                    f"logit_bias keys must be token ids (non-negative integers), got {k[:40]!r}", param="logit_bias"
                )
            out[int(k)] = v
        return out

    def check_unsupported(self) -> None:
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, list):
            raise InvalidRequestError("stop_token_ids must be a list of non-negative token ids", param="stop_token_ids")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")


PromptField = str | list[str] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(_SamplingFields):
    prompt: SkipValidation[PromptField]  # `checked_prompts`
    max_tokens: StrictInt | None = 16  # OpenAI's default for completions
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: str | None = None
    best_of: StrictInt | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequestError(
                "max_tokens must be an integer >= 1 (0 only with echo, to score the prompt), got 0", param="max_tokens"
            )
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if self.best_of not in (None, self.n):
            raise InvalidRequestError("best_of must equal n (best-of sampling is not supported)", param="best_of")

    def checked_prompts(self) -> list[str | list]:
        """The prompts, each a string or a list (its items, token ids, are checked after its length)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p, list) and not p:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        if isinstance(p, list):
            if type(p[0]) is int:  # one prompt as token ids (bools are not ids)
                return [p]
            for kind in (str, list):
                if isinstance(p[0], kind) and all(isinstance(x, kind) for x in p):
                    return p
        raise InvalidRequestError(
            "prompt must be a string, a list of strings, a list of token ids (integers) or a list of token-id lists",
            param="prompt",
        )


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


# OpenAI's content parts, typed so the schema (and a fuzzer reading it) knows them; only text is served.
class TextContentPart(_Part):
    type: Literal["text"]
    text: str


class ImageURL(_Part):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImageURLContentPart(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Part):
    data: str
    format: Literal["wav", "mp3"]


class InputAudioContentPart(_Part):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FileContent(_Part):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None


class FileContentPart(_Part):
    type: Literal["file"]
    file: FileContent


class RefusalContentPart(_Part):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[
    TextContentPart | ImageURLContentPart | InputAudioContentPart | FileContentPart | RefusalContentPart,
    Field(discriminator="type"),
]


class FunctionCall(_Part):
    name: str
    arguments: str | dict[str, Any]  # OpenAI sends JSON text; some clients an object


class ToolCallMessage(_Part):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallMessage] | None = None  # an assistant's past calls
    tool_call_id: str | None = None  # a tool result: the call it answers
    name: str | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if not isinstance(part, TextContentPart):
                raise InvalidRequestError(
                    f"messages[{index}]: only text content parts are supported, got type {part.type!r}",
                    param="messages",
                )
            parts.append(part.text)
        return "".join(parts)


TOOL_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"  # OpenAI's rule for function names


class FunctionDefinition(_Part):
    # In the schema for clients and fuzzers; checked by `tools.checked_tools`, with a message that says it.
    name: Annotated[str, Field(json_schema_extra={"pattern": TOOL_NAME_PATTERN})]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Part):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Part):
    name: str


class NamedToolChoice(_Part):
    type: Literal["function"]
    function: ToolChoiceFunction


class ChatCompletionRequest(_SamplingFields):
    messages: SkipValidation[list[ChatMessage]] = Field(min_length=1)  # `checked_messages`
    max_tokens: StrictInt | None = None  # None: up to max_model_len
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: SkipValidation[list[Tool] | None] = None  # `checked_tools`, on the worker thread
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    add_generation_prompt: StrictBool = True

    def checked_tools(self) -> list[Tool]:
        raw = self.tools
        if raw is None:
            return []
        if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
            raise InvalidRequestError(f"tools must be a list of at most {MAX_TOOLS} function tools", param="tools")
        out = []
        for i, t in enumerate(raw):
            try:
                out.append(Tool.model_validate(t))
            except ValidationError as e:
                raise InvalidRequestError(*validation_message(e.errors(), ("tools", i))) from None
        return out

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs to be true", param="top_logprobs")

    def checked_messages(self) -> list[ChatMessage]:
        """The messages, validated one at a time (a short call each, so other threads get the GIL)."""
        raw = self.messages
        if not isinstance(raw, list) or not raw:
            raise InvalidRequestError("messages must be a non-empty list of message objects", param="messages")
        out = []
        for i, m in enumerate(raw):
            content = m.get("content") if isinstance(m, dict) else None
            for j, part in enumerate(content if isinstance(content, list) else ()):
                # Said before pydantic's union errors would ("content.str: Input should be a valid string").
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise InvalidRequestError(
                        f"messages[{i}]: only text content parts are supported, got type {kind!r}", param="messages"
                    )
                if not isinstance(part.get("text"), str):
                    raise InvalidRequestError(
                        f"messages[{i}].content[{j}]: a text part needs a string 'text'", param="messages"
                    )
            try:
                msg = ChatMessage.model_validate(m)
            except ValidationError as e:
                raise InvalidRequestError(*validation_message(e.errors(), ("messages", i))) from None
            if msg.role == "tool" and not msg.tool_call_id:
                raise InvalidRequestError(
                    f"messages[{i}]: a tool message needs tool_call_id, the id of the call it answers",
                    param="messages",
                )
            if msg.tool_calls and msg.role != "assistant":
                raise InvalidRequestError(
                    f"messages[{i}]: only assistant messages carry tool_calls, not {msg.role}", param="messages"
                )
            out.append(msg)
        return out


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Checked messages as the chat template takes them. "developer" is OpenAI's newer name for
    "system"; chat templates know only the latter."""
    out = []
    for i, m in enumerate(messages):
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
        if m.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.role == "tool":
            d["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                d["name"] = m.name
        out.append(d)
    return out


def kept_texts(raw: list) -> list[str]:
    """The text of raw (unchecked) messages every chat template keeps whole: system and user turns
    (not assistant turns: some templates drop past reasoning). A lower bound on what is encoded."""
    texts = []
    for m in raw:
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user"):
            continue
        content = m.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [
                p["text"]
                for p in content
                if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            ]
    return texts
