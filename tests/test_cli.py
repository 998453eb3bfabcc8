"""The `membound` command, run in-process on a tiny dummy model and on the default model."""

from __future__ import annotations

import pytest

from membound.entrypoints.cli import build_parser, main
from tests.conftest import save_tiny_hf_model


def test_generate_on_the_default_model_names_paris(capsys):
    assert (
        main(
            [
                "generate",
                "The capital of France is",
                "--max-tokens",
                "4",
                "--max-model-len",
                "512",
                "--kv-cache-memory",
                "64",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is") and "Paris" in out


def test_chat_repl_streams_and_keeps_history(monkeypatch, capsys):
    lines = iter(["What is the capital of France?", "/reset", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--max-tokens", "16", "--max-model-len", "512", "--kv-cache-memory", "64"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_bad_model_path_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "hi", "--model", str(tmp_path / "missing.gguf")]) == 2
    assert "not found" in capsys.readouterr().err


def test_help_lists_the_commands():
    text = build_parser().format_help()
    assert "generate" in text and "chat" in text and "serve" in text


def test_serve_help_documents_the_vllm_named_flags(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    flags = "--host --port --max-model-len --gpu-memory-utilization --max-num-seqs --max-num-batched-tokens "
    flags += "--enable-prefix-caching --no-enable-prefix-caching --dtype --served-model-name --api-key "
    flags += "--max-queued-requests --shutdown-timeout"
    for flag in flags.split():
        assert flag in text, flag


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--port", "70000"], "port must be an integer in [0, 65535]"),
        (["--max-queued-requests", "0"], "max_queued_requests must be a positive integer"),
        (["--api-key", ""], "api_key must not be empty"),
        (["a.gguf", "--model", "b.gguf"], "two models given"),
    ],
)
def test_serve_rejects_bad_settings_before_loading(args, needle, capsys):
    assert main(["serve", *args]) == 2
    assert needle in capsys.readouterr().err


def test_generate_on_a_hf_folder_without_tokenizer_reports_it(tmp_path, capsys):
    save_tiny_hf_model(tmp_path, "llama")
    assert main(["generate", "hi", "--model", str(tmp_path)]) == 2
    assert "cannot load a tokenizer" in capsys.readouterr().err
