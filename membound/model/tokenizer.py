"""Tokenizer, chat template and incremental detokenization, via HF tokenizers/transformers."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
from typing import Any

from tokenizers.decoders import DecodeStream

from membound.errors import InvalidRequestError, ModelLoadError

log = logging.getLogger(__name__)


class Tokenizer:
    """A thin typed wrapper over a transformers tokenizer."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        self.backend = hf_tokenizer.backend_tokenizer  # the Rust `tokenizers.Tokenizer`
        self._texts: dict[int, str] = {}  # token_text's cache

    @classmethod
    def from_model_path(cls, path: str) -> Tokenizer:
        """From a HF folder's tokenizer files, or from the vocab embedded in a GGUF."""
        from transformers import AutoTokenizer

        p = pathlib.Path(path)
        try:
            if p.is_file():
                tok = _gguf_tokenizer(p)
            else:
                tok = AutoTokenizer.from_pretrained(str(p))
        except Exception as e:  # transformers raises many types for missing/corrupt files
            raise ModelLoadError(f"cannot load a tokenizer from {path}: {e}") from e
        if not getattr(tok, "is_fast", False):
            raise ModelLoadError(f"{path}: only fast (HF tokenizers) tokenizers are supported")
        return cls(tok)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, field: str = "prompt", *, add_special_tokens: bool = True) -> list[int]:
        check_text(text, field)
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode_rendered(self.render_chat(messages, add_generation_prompt))

    @property
    def chat_template(self) -> str | None:
        t = self.hf.chat_template
        return t if isinstance(t, str) else None

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        """The chat template's text for these messages (what `apply_chat_template` encodes); `tools`
        (OpenAI's function definitions) go to templates that show them. Messages may carry tool turns'
        fields (`tool_calls`, `tool_call_id`) beside their role and text."""
        if not messages:
            raise InvalidRequestError("messages must be a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidRequestError(f"messages[{i}] must have a string 'role' and a string 'content'")
            check_text(m["role"], f"messages[{i}].role")
            check_text(m["content"], f"messages[{i}].content")
        if not self.hf.chat_template:
            raise InvalidRequestError("this model has no chat template; use generate() with a plain prompt")
        try:
            text = self.hf.apply_chat_template(
                messages, tools=tools or None, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except Exception as e:  # jinja2 raises TemplateError for e.g. "roles must alternate"; templates raise others
            raise InvalidRequestError(
                f"the model's chat template rejected these messages: {e}", param="messages"
            ) from e
        check_text(text, "messages (with tools and tool calls, as rendered)")
        return text

    def encode_rendered(self, text: str) -> list[int]:
        """Token ids of a rendered chat template: it already holds any BOS it wants; encode adds none."""
        return self.hf.encode(text, add_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (byte-level BPE, SentencePiece with byte fallback, or plain)."""
        piece = self.hf.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if self._byte_decoder is not None:
            try:
                return bytes(self._byte_decoder[c] for c in piece)
            except KeyError:
                return piece.encode()  # an added/special token, stored as plain text
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def token_text(self, token_id: int) -> str:
        """One token's text on its own; a token holding part of a UTF-8 character shows U+FFFD
        (its `token_bytes` stay exact). Cached: logprobs ask for k + 1 of them per row and step."""
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.token_bytes(token_id).decode("utf-8", errors="replace")
        return text

    def special_token_ids(self, texts) -> list[int]:
        """Ids of those of these special tokens the vocabulary has (one token each)."""
        vocab = self.hf.get_vocab()
        return [vocab[t] for t in texts if t in vocab and self.is_special_token(t)]

    def is_special_token(self, text: str) -> bool:
        """Whether `text` is an added token that decoding with skip_special_tokens drops."""
        return any(t.content == text and t.special for t in self.hf.added_tokens_decoder.values())

    @property
    def _byte_decoder(self) -> dict[str, int] | None:
        if not hasattr(self, "_bd"):
            self._bd = None
            if type(self.backend.decoder).__name__ == "ByteLevel":
                from transformers.convert_slow_tokenizer import bytes_to_unicode

                self._bd = {c: b for b, c in bytes_to_unicode().items()}
        return self._bd

    def detokenizer(self, prompt_ids: list[int], skip_special_tokens: bool) -> Detokenizer:
        return Detokenizer(self, prompt_ids, skip_special_tokens)

    def token_strs(self, ids: list[int]) -> list[str]:
        """Each id's vocabulary entry as stored ("Ġworld" for byte-level BPE), as vLLM's /tokenize returns them."""
        return self.hf.convert_ids_to_tokens(ids)

    def info(self) -> dict[str, Any]:
        """The tokenizer's configuration as JSON (what tokenizer_config.json holds), as vLLM's /tokenizer_info
        reports it: the tokenizer's init arguments without file paths (added tokens as their text), its class,
        the special tokens as text and ids, the chat template and the vocabulary size."""
        hf = self.hf
        info = {k: _json_safe(v) for k, v in (getattr(hf, "init_kwargs", None) or {}).items() if k not in _PATH_KEYS}
        info["added_tokens_decoder"] = {str(i): t.content for i, t in sorted(hf.added_tokens_decoder.items())}
        for name in ("bos", "eos", "pad", "unk"):
            info[f"{name}_token"] = getattr(hf, f"{name}_token")
            info[f"{name}_token_id"] = getattr(hf, f"{name}_token_id")
        info["chat_template"] = hf.chat_template if isinstance(hf.chat_template, str) else None
        info["vocab_size"] = self.vocab_size
        info["tokenizer_class"] = type(hf).__name__
        return info

    def export(self, directory: str | os.PathLike, model_max_length: int | None = None) -> list[str]:
        """Write this tokenizer as a HF folder that `AutoTokenizer.from_pretrained` loads (transformers 4 and 5):
        tokenizer.json, and tokenizer_config.json holding the special tokens and the chat template (not a
        separate chat_template.jinja, which older transformers do not read). Returns the files' names."""
        out = pathlib.Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for stale in _SHADOWING_FILES:  # left by an earlier tokenizer: they would override what is written now
            (out / stale).unlink(missing_ok=True)
        written = self.hf.save_pretrained(str(out), save_jinja_files=False)
        cfg_path = out / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        for key in _PATH_KEYS:
            cfg.pop(key, None)
        # The generic fast class: transformers 5 names it TokenizersBackend, which transformers 4 does not know.
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        if model_max_length is not None:
            cfg["model_max_length"] = model_max_length
        if isinstance(self.hf.chat_template, str):
            cfg["chat_template"] = self.hf.chat_template
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        return sorted(pathlib.Path(f).name for f in written)


# Loading hints and file paths of the process that loaded a tokenizer: meaningless to anyone else.
_PATH_KEYS = ("vocab_file", "merges_file", "tokenizer_file", "name_or_path", "is_local", "local_files_only")
_SHADOWING_FILES = (
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def _json_safe(value: Any) -> Any:
    """A tokenizer init argument as JSON: added tokens as their text, containers item by item."""
    if hasattr(value, "content") and isinstance(value.content, str):  # tokenizers.AddedToken
        return value.content
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def check_text(text: str, field: str) -> None:
    """Text the tokenizer cannot take (a lone surrogate from a JSON "\\ud800" escape) is the
    client's error, named by field, not a TypeError deep inside the Rust tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            f"{field} is not valid Unicode text: U+{ord(text[e.start]):04X} at character {e.start} is a lone "
            "surrogate (a UTF-16 half); send UTF-8 text or a properly paired escape",
            param=field,
        ) from None


def tokenizer_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MEMBOUND_CACHE", pathlib.Path.home() / ".cache" / "membound"))


def _gguf_tokenizer(path: pathlib.Path):
    """Build the tokenizer from a GGUF's vocab, cached: converting takes seconds, loading the cache does not."""
    from transformers import AutoTokenizer

    st = path.stat()
    # The format version: bumped when what the conversion saves changes (2: fallback chat templates).
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|2".encode()).hexdigest()[:16]
    cache = tokenizer_cache_dir() / "tokenizers" / key
    if (cache / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cache))
        except Exception:  # a damaged cache entry is rebuilt below
            pass
    log.info("building the tokenizer from %s's vocab (once; cached in %s)", path.name, cache)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if not tok.chat_template:  # saved with the cache, so this runs with the conversion only
        from membound.model.chat_templates import FALLBACK_TEMPLATES
        from membound.model.loader import GGUFFile

        tok.chat_template = FALLBACK_TEMPLATES.get(GGUFFile(str(path)).arch)
    try:
        tmp = cache.with_name(f"{key}.tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        tmp.replace(cache) if not cache.exists() else shutil.rmtree(tmp)
    except OSError:
        pass  # a read-only home only costs the conversion next time
    return tok


class Detokenizer:
    """Turns sampled ids into text piece by piece, never splitting a UTF-8 character.

    The stream is primed with the prompt's tail so spacing rules that depend on the
    previous token (e.g. SentencePiece's leading space) come out right.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool) -> None:
        self.token_text = tokenizer.token_text  # for logprobs' decoded_token
        self._tok = tokenizer.backend
        self._skip = skip_special_tokens
        self._stream = DecodeStream(ids=list(prompt_ids[-8:]), skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        try:
            return self._stream.step(self._tok, token_id) or ""
        except Exception as e:
            # Some sampled sequences leave DecodeStream's internal prefix invalid (tokenizers
            # issue 1763); a fresh stream from this token on loses at most a spacing nuance.
            if "Invalid prefix" not in str(e):
                raise
            log.warning("detokenizer: %s; restarting the decode stream", e)
            self._stream = DecodeStream(skip_special_tokens=self._skip)
            return self._stream.step(self._tok, token_id) or ""
