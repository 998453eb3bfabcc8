"""Tool calling: tools into the prompt, calls out of the text, and forced choices as grammars.

- Rendering: `tools` and the tool turns of a conversation go through the model's chat template when
  it knows tools; a template that does not (SmolLM2's) gets them as a system preamble in the Hermes
  format instead, with past calls and results written as that format's tags, so the model still
  sees them (llama.cpp does the same for such templates).
- Parsing (`tool_choice: "auto"`): the output text is searched for calls in the format of the
  model's family: Hermes / Qwen `<tool_call>{json}</tool_call>`, Llama 3 JSON
  (`{"name", "parameters"}`, optionally after `<|python_tag|>`), Mistral `[TOOL_CALLS]`.
  A call that does not parse, or names a function not offered, leaves the whole text as content;
  text around calls stays content: nothing is dropped.
- Forcing (`"required"` or a named function): a JSON schema the output must match, so the
  arguments always parse and validate; the output is then the calls themselves.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

from membound.errors import InvalidRequestError
from membound.sampling_params import StructuredOutputsParams
from membound.server.protocol import TOOL_NAME_PATTERN

PARSERS = ("hermes", "llama3_json", "mistral")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_message(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def pick_parser(template: str | None, requested: str = "auto") -> str:
    """The parser for this model: as asked, or the format its chat template writes."""
    if requested != "auto":
        if requested not in PARSERS:
            raise ValueError(f"unknown tool call parser {requested!r}; choose one of auto, {', '.join(PARSERS)}")
        return requested
    t = template or ""
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<tool_call>" in t or not template_knows_tools(t):
        return "hermes"  # also the format of the preamble written for templates without tools
    if "<|python_tag|>" in t or '"parameters"' in t or "ipython" in t:
        return "llama3_json"
    return "hermes"


def markers(parser: str) -> tuple[str, ...]:
    """Text that starts a call in this format (streaming holds back what may begin one)."""
    return {"hermes": ("<tool_call>",), "mistral": ("[TOOL_CALLS]",), "llama3_json": ("<|python_tag|>",)}[parser]


# ------------------------------------------------------------------------------------ rendering


def checked_tools(tools: list | None, tool_choice: Any) -> tuple[list[dict], str | dict]:
    """The tools as plain dicts and the effective tool_choice ("none", "auto", "required" or a
    function's name as {"name": ...}); every inconsistency is a 400 naming the field."""
    tools = tools or []
    out, names = [], set()
    for i, t in enumerate(tools):
        f = t.function
        if not re.fullmatch(TOOL_NAME_PATTERN, f.name):
            raise InvalidRequestError(
                f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-', got {f.name[:70]!r}",
                param="tools",
            )
        if f.name in names:
            raise InvalidRequestError(f"tools: function {f.name!r} is defined twice", param="tools")
        names.add(f.name)
        fn: dict[str, Any] = {"name": f.name}
        if f.description is not None:
            fn["description"] = f.description
        params = f.parameters if f.parameters is not None else {"type": "object", "properties": {}}
        if params.get("type", "object") != "object":  # arguments are an object, in every format
            raise InvalidRequestError(
                f"tools[{i}].function.parameters must be a JSON schema of an object "
                f'(type "object"), got type {str(params.get("type"))[:40]!r}',
                param="tools",
            )
        fn["parameters"] = {"type": "object", **params}
        out.append({"type": "function", "function": fn})
    choice = tool_choice if tool_choice is not None else ("auto" if out else "none")
    if choice != "none" and not out:
        raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
    if isinstance(choice, str):  # (pydantic's Literal took the other strings)
        return out, choice
    name = choice.function.name
    if name not in names:
        raise InvalidRequestError(
            f"tool_choice names function {name[:70]!r}, which is not among tools "
            f"({', '.join(sorted(names)) or 'none given'})",
            param="tool_choice",
        )
    return out, {"name": name}


def _arguments_value(arguments: Any) -> Any:
    """A past call's arguments as templates read them: an object (Qwen's and Llama's `tojson` them)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def render_messages(messages: list[dict], tools: list[dict], native: bool) -> list[dict]:
    """Messages (role, content, tool_calls, tool_call_id) for a template that knows tools (`native`),
    or, for one that does not, rewritten in the Hermes format it can show."""
    if native:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [
                    {**c, "function": {**c["function"], "arguments": _arguments_value(c["function"]["arguments"])}}
                    for c in m["tool_calls"]
                ]
            out.append(m)
        return out
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if m.get("tool_calls"):
            calls = [
                "<tool_call>\n"
                + json.dumps({"name": c["function"]["name"], "arguments": _arguments_value(c["function"]["arguments"])})
                + "\n</tool_call>"
                for c in m["tool_calls"]
            ]
            content = "\n".join(([content] if content else []) + calls)
        if role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("from_tool"):  # consecutive results: one turn, as roles may have to alternate
                out[-1]["content"] += "\n" + content
                continue
        out.append({"role": role, "content": content, **({"from_tool": True} if m["role"] == "tool" else {})})
    for m in out:
        m.pop("from_tool", None)
    if tools:
        preamble = _preamble(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{preamble}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


def _preamble(tools: list[dict]) -> str:
    listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return (
        "You may call functions to answer. They are described by these JSON schemas:\n"
        f"<tools>\n{listed}\n</tools>\n"
        "To call one, reply with a JSON object holding its name and arguments between tags, once per call:\n"
        '<tool_call>\n{"name": "<function name>", "arguments": {<its arguments>}}\n</tool_call>'
    )


# ------------------------------------------------------------------------------------ forcing


def forced_output(tools: list[dict], choice: str | dict, parallel: bool) -> StructuredOutputsParams | None:
    """The grammar for a required or named choice (None for auto / none): a named function's output
    is its arguments object; required's is a list of {"name", "parameters"} calls (vLLM's shape)."""
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    if isinstance(choice, dict):
        return StructuredOutputsParams(json=by_name[choice["name"]]["parameters"])
    if choice != "required":
        return None
    # Each function's schema moves inside the list's; its "$defs" go to the root, where its
    # "#/$defs/..." references still point.
    defs: dict[str, Any] = {}
    one = []
    for name, f in by_name.items():
        params = dict(f["parameters"])
        for k, v in (params.pop("$defs", None) or {}).items():
            if k in defs and defs[k] != v:
                raise InvalidRequestError(
                    f"tools: two functions define $defs {k!r} differently; tool_choice required puts every "
                    "function's $defs in one schema, so give them distinct names",
                    param="tools",
                )
            defs[k] = v
        one.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "parameters": params},
                "required": ["name", "parameters"],
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": one[0] if len(one) == 1 else {"anyOf": one}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return StructuredOutputsParams(json=schema)


def forced_calls(text: str, choice: str | dict) -> list[ToolCall]:
    """The calls in a forced choice's output (which its grammar made valid JSON, unless cut short)."""
    if isinstance(choice, dict):
        return [ToolCall(choice["name"], text)]
    # Element by element: a list cut off by max_tokens still gives the calls it completed.
    dec, items = json.JSONDecoder(), []
    t = text.lstrip()
    i = 1
    while t.startswith("["):
        while i < len(t) and (t[i].isspace() or t[i] == ","):
            i += 1
        try:
            obj, i = dec.raw_decode(t, i)
        except (ValueError, RecursionError):
            break
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and "parameters" in obj):
            break
        items.append(obj)
    return [ToolCall(x["name"], json.dumps(x["parameters"], ensure_ascii=False)) for x in items]


# ------------------------------------------------------------------------------------ parsing


def parse(parser: str, text: str, names: frozenset[str] | None = None) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) from a whole output; content is None when the output is only calls. A call
    that does not parse, or names a function not in `names`, leaves the whole text as content."""
    try:
        content, calls = _PARSE[parser](text)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return text, []  # a malformed call: the text stays, as text
    if not calls or (names is not None and any(c.name not in names for c in calls)):
        return text, []
    return (content or None), calls


def _call(obj: Any, args_key: str = "arguments") -> ToolCall:
    name = obj["name"]
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        args = json.loads(args)  # arguments sent as JSON text must still be an object
    if not isinstance(name, str) or not isinstance(args, dict):
        raise TypeError("not a call")
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


def _hermes(text: str) -> tuple[str, list[ToolCall]]:
    """Calls in <tool_call> blocks; content is the text outside them (the last block may be unclosed)."""
    start = text.find("<tool_call>")
    if start < 0:
        return text, []
    calls, content = [], [text[:start]]
    for block in text[start:].split("<tool_call>")[1:]:
        body, closed, after = block.partition("</tool_call>")
        calls.append(_call(json.loads(body)))
        if closed:
            content.append(after.strip("\n") if after.strip() else "")
    return "".join(content), calls


def _llama3(text: str) -> tuple[str, list[ToolCall]]:
    s = text.strip()
    if s.startswith("<|python_tag|>"):
        s = s[len("<|python_tag|>") :].strip()
    if not s.startswith("{"):
        return text, []
    dec, calls, i = json.JSONDecoder(), [], 0
    while i < len(s):
        obj, i = dec.raw_decode(s, i)
        calls.append(_call(obj, "parameters"))
        rest = s[i:].lstrip()
        if not rest:
            break
        if not rest.startswith(";"):
            raise ValueError("text after a call")
        i = len(s) - len(rest) + 1
        while i < len(s) and s[i].isspace():
            i += 1
    return "", calls


def _mistral(text: str) -> tuple[str, list[ToolCall]]:
    start = text.find("[TOOL_CALLS]")
    if start < 0:
        return text, []
    calls = []
    for part in text[start:].split("[TOOL_CALLS]")[1:]:
        part = part.strip()
        if part.startswith("["):  # v3: a JSON list of {"name", "arguments"}
            calls += [_call(x) for x in json.loads(part)]
        else:  # v11+: name[ARGS]{json}
            name, sep, args = part.partition("[ARGS]")
            if not sep or not isinstance(json.loads(args), dict):
                raise ValueError("not a call")
            calls.append(ToolCall(name.strip(), args.strip()))
    return text[:start], calls


_PARSE = {"hermes": _hermes, "llama3_json": _llama3, "mistral": _mistral}


class StreamParser:
    """Streams content until a call may begin, then holds the rest and parses it at the end
    (so streamed deltas add up to exactly the non-streamed message)."""

    def __init__(self, parser: str, names: frozenset[str] | None = None) -> None:
        self.parser, self.names = parser, names
        self._text = ""
        self._sent = 0  # how much of _text went out as content
        self._holding = False  # a call has begun: nothing more is streamed as content

    def feed(self, delta: str) -> str:
        """Content that can go out now."""
        self._text += delta
        if self._holding:
            return ""
        t = self._text
        if self.parser == "llama3_json":  # a call in this format is the whole output, from its start
            if self._sent == 0:
                s = t.lstrip()
                if s.startswith(("{", "<|python_tag|>")):
                    self._holding = True
                    return ""
                if not s or "<|python_tag|>".startswith(s):
                    return ""  # may still become one
            out, self._sent = t[self._sent :], len(t)
            return out
        hits = [i for m in markers(self.parser) if (i := t.find(m, self._sent)) >= 0]
        if hits:
            self._holding = True
            end = min(hits)
        else:  # hold back a tail that may be the start of a marker
            end = len(t)
            for m in markers(self.parser):
                for k in range(min(len(m) - 1, len(t)), 0, -1):
                    if t.endswith(m[:k]):
                        end = min(end, len(t) - k)
                        break
        out, self._sent = t[self._sent : end], max(self._sent, end)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(the content not yet sent, the calls) once the output is complete."""
        content, calls = parse(self.parser, self._text, self.names)
        if not calls:
            rest, self._sent = self._text[self._sent :], len(self._text)
            return rest, []
        content = content or ""
        rest = content[self._sent :] if len(content) > self._sent else ""
        self._sent = len(self._text)
        return rest, calls
