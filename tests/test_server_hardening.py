"""`membound serve` against what one client, or the machine, can throw at it (issue 20): huge
bodies never stall the other clients, a shutdown past its timeout ends every request cleanly,
and start-up failures say what is wrong in one line before anything listens.

Real server processes on the tiny random Llama with SmolLM2's tokenizer (`tiny_model_dir`)."""

from __future__ import annotations

import json
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from tests.server_utils import ServerProcess, free_port, tiny_server_args


def _args(model_dir, *extra: str) -> list[str]:
    return tiny_server_args(model_dir, 512, *extra)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "hardening.log"
    s = ServerProcess(_args(tiny_model_dir, "--max-request-body-mb", "16"), log)
    yield s
    assert s.stop() == 0, s.log_tail()


JSON = {"Content-Type": "application/json"}


# ---------------------------------------------------------------------- big requests


class _Stream(threading.Thread):
    """One long greedy stream; the arrival time of each SSE chunk."""

    def __init__(self, url: str, i: int) -> None:
        super().__init__(daemon=True)
        self.url, self.i = url, i
        self.times: list[float] = []
        self.finish: str | None = None

    def run(self) -> None:
        body = {"prompt": f"Stream {self.i} tells a long story", "max_tokens": 480, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    self.times.append(time.perf_counter())
                    self.finish = json.loads(line[6:])["choices"][0]["finish_reason"] or self.finish


class _HealthPoller(threading.Thread):
    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.samples: list[tuple[float, float]] = []  # (sent at, seconds to answer)
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as h:
            while not self.stop.is_set():
                t = time.perf_counter()
                assert h.get(f"{self.url}/health").status_code == 200
                self.samples.append((t, time.perf_counter() - t))
                time.sleep(0.05)


def test_huge_requests_never_stall_other_streams_or_health(server):
    # Bodies are encoded before the clock starts: the client's own json.dumps is not the server's time.
    big = {
        "10 MB prompt": ("completions", {"prompt": "word " * 2_000_000, "max_tokens": 4}, "maximum context length"),
        "10 MB chat message": (
            "chat/completions",
            {"messages": [{"role": "user", "content": "word " * 2_000_000}]},
            "maximum context length",
        ),
        "10 MB assistant turn": (  # not in the cheap bound (templates may drop it): bounded once rendered
            "chat/completions",
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 2_000_000}]},
            "maximum context length",
        ),
        "1M token ids": ("completions", {"prompt": [5] * 1_000_000}, "the prompt has 1000000 tokens"),
        "100k prompts": ("completions", {"prompt": [f"p{k}" for k in range(100_000)]}, "--max-queued-requests"),
        "100k messages": (
            "chat/completions",
            {"messages": [{"role": "user", "content": "hi"}] * 100_000},
            "maximum context length",
        ),
    }
    encoded = {name: (path, json.dumps(body).encode(), needle) for name, (path, body, needle) in big.items()}
    streams = [_Stream(server.url, k) for k in range(4)]
    for s in streams:
        s.start()
    deadline = time.monotonic() + 60
    while not all(len(s.times) >= 60 for s in streams):  # all four decode at their steady rate
        assert time.monotonic() < deadline, "streams did not start"
        time.sleep(0.02)
    health = _HealthPoller(server.url)
    health.start()
    time.sleep(0.3)

    took = {}
    t_start = time.perf_counter()
    with httpx.Client(base_url=server.url, timeout=60) as h:
        for name, (path, body, needle) in encoded.items():
            t = time.perf_counter()
            r = h.post(f"/v1/{path}", content=body, headers=JSON)
            took[name] = time.perf_counter() - t
            assert r.status_code == 400, (name, r.text[:300])
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and needle in err["message"], (name, err)
    t_end = time.perf_counter()
    time.sleep(0.3)
    health.stop.set()
    health.join(10)
    for s in streams:
        s.join(120)

    for s in streams:
        assert s.finish == "length" and s.times[-1] > t_end, "a stream ended before the big requests did"
    gaps = [b - a for s in streams for a, b in zip(s.times, s.times[1:], strict=False) if b >= t_start and a <= t_end]
    during = [lat for sent, lat in health.samples if t_start <= sent <= t_end]
    report = (
        f"max inter-chunk gap {max(gaps):.3f}s over {len(gaps)} gaps (median {sorted(gaps)[len(gaps) // 2]:.3f}s) "
        f"in {t_end - t_start:.2f}s; /health max {max(during):.3f}s "
        f"over {len(during)} polls; time to the 400: " + ", ".join(f"{k} {v:.2f}s" for k, v in took.items())
    )
    print(report)
    assert len(during) >= 3, report
    assert max(gaps) < 0.5, report
    assert max(during) < 0.2, report
    assert all(v < 3 for v in took.values()), report


def test_the_body_limit_is_validated():
    from membound.errors import ConfigError
    from membound.server import ServerConfig

    assert ServerConfig().max_request_body_bytes == 4 << 20
    for bad in (0, 100, 2.5, True, None):
        with pytest.raises(ConfigError, match="max_request_body_bytes"):
            ServerConfig(max_request_body_bytes=bad)


def test_a_body_over_the_limit_is_a_413_and_the_connection_lives_on(server):
    limit = 16 << 20
    too_big = b'{"prompt": "' + b"x" * limit + b'"}'

    def chunked():
        step = 1 << 20
        for k in range(0, len(too_big), step):
            yield too_big[k : k + step]

    with httpx.Client(base_url=server.url, timeout=60) as h:  # one keep-alive connection
        for content in (too_big, chunked()):  # by Content-Length, unread; and counted as it streams
            r = h.post("/v1/completions", content=content, headers=JSON)
            assert r.status_code == 413, r.text[:300]
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
            assert f"limit of {limit} bytes (--max-request-body-mb)" in err["message"], err
            ok = h.post("/v1/completions", json={"prompt": "fine", "max_tokens": 2})
            assert ok.status_code == 200, ok.text
    # Just under the limit is parsed (and refused for its length, not its size).
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x" * (limit - 100)}, timeout=60)
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]


def test_cheap_bounds_keep_the_existing_messages(server):
    with httpx.Client(base_url=server.url, timeout=60) as h:
        # A text short enough for the bound is tokenized and reported exactly, as before.
        r = h.post("/v1/completions", json={"prompt": "word " * 600})
        assert r.status_code == 400
        assert "maximum context length is 512 tokens, but the prompt has 601 tokens;" in r.json()["error"]["message"]
        # prompts x n over --max-queued-requests, before any tokenizing.
        r = h.post("/v1/completions", json={"prompt": ["a"] * 600, "n": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        assert "asks for 1200 sequences (prompts x n) but at most 1024" in r.json()["error"]["message"]
        # Shape errors of the fields checked off the loop are 400s naming the field.
        for body, param in [
            ({"prompt": [1, "a"]}, "prompt"),
            ({"prompt": [[1], "a"]}, "prompt"),
            ({"prompt": [1, True]}, "prompt"),
            ({"prompt": {"a": 1}}, "prompt"),
            ({"prompt": "x", "stop_token_ids": 5}, "stop_token_ids"),
            ({"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
            ({"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
        ]:
            r = h.post("/v1/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
        for messages in ("hi", [], [3], [{"role": "user", "content": [{"type": "video"}]}]):
            r = h.post("/v1/chat/completions", json={"messages": messages})
            assert r.status_code == 400 and r.json()["error"]["param"] == "messages", (messages, r.text)
        # A prompt that may fit is counted exactly before max_tokens is judged (not "at least 0 tokens").
        r = h.post("/v1/completions", json={"prompt": "word " * 10, "max_tokens": 600})
        msg = r.json()["error"]["message"]
        assert r.status_code == 400 and "at least" not in msg and "max_tokens is 600 (" in msg, msg
        for part, want in [
            (
                {"type": "image_url", "image_url": "http://x"},
                "only text content parts are supported, got type 'image_url'",
            ),
            ({"type": "input_text"}, "only text content parts are supported, got type 'input_text'"),
            ({"type": "text"}, "messages[0].content[0]: a text part needs a string 'text'"),
        ]:
            r = h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [part]}]})
            assert r.status_code == 400 and want in r.json()["error"]["message"], (part, r.text)
        # Every token is checked against each stop on the engine thread: bounded, and not echoed back whole.
        for body in ({"prompt": "x", "stop": ["ab"] * 100_000}, {"prompt": "x", "stop_token_ids": [7] * 100_000}):
            r = h.post("/v1/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] in ("stop", "stop_token_ids"), r.text[:300]
            assert len(r.content) < 2000 and "at most" in r.json()["error"]["message"]
        parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
        r = h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}], "max_tokens": 2})
        assert r.status_code == 200, r.text


# ---------------------------------------------------------------------- shutdown


def test_shutdown_past_its_timeout_ends_streams_with_abort_and_requests_with_an_error(tiny_model_dir, tmp_path):
    # 0.3 s: far less than the ~1.3 s the 480 tokens take at the tiny model's fastest.
    server = ServerProcess(_args(tiny_model_dir, "--shutdown-timeout", "0.3"), tmp_path / "s.log")
    long = {"prompt": "Count", "max_tokens": 480, "ignore_eos": True}
    lines: list[str] = []
    full: list[httpx.Response] = []

    def stream() -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**long, "stream": True}, timeout=120) as r:
            lines.extend(line for line in r.iter_lines() if line)

    def non_streaming() -> None:
        full.append(httpx.post(f"{server.url}/v1/completions", json=long, timeout=120))

    threads = [threading.Thread(target=stream), threading.Thread(target=non_streaming)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while server.metrics()["membound:num_requests_running"] < 2 or not lines:
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.05)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    rc = server.stop()
    took = time.monotonic() - t0
    log = server.log_tail(20000)
    assert rc == 0, log
    assert lines[-1] == "data: [DONE]", lines[-3:]
    last = json.loads(lines[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "abort", lines[-3:]
    assert len(lines) < 480  # cut short, not run to max_tokens
    (r,) = full
    assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text
    assert "shutting down" in r.json()["error"]["message"] and "--shutdown-timeout" in r.json()["error"]["message"]
    assert "Traceback" not in log and "aborting them" in log, log
    print(f"shutdown with 2 requests in flight: exit {rc} {took:.2f}s after SIGTERM (--shutdown-timeout 0.3)")
    assert took < 5, log


# ---------------------------------------------------------------------- start-up failures


def _serve(*args: str, timeout: float = 120) -> tuple[int, str, str, float]:
    t = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "membound.entrypoints.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return p.returncode, p.stdout, p.stderr, time.monotonic() - t


def _default_gguf() -> pathlib.Path:
    from membound.model.registry import default_model_path

    return pathlib.Path(default_model_path())


@pytest.mark.parametrize("kind", ["random", "truncated"])
def test_a_bad_gguf_fails_in_one_line_with_exit_2_before_listening(tmp_path, kind):
    bad = tmp_path / f"{kind}.gguf"
    if kind == "random":
        bad.write_bytes(np.random.default_rng(0).bytes(1 << 16))
        want = "is not a valid GGUF file"
    else:
        with open(_default_gguf(), "rb") as f:
            bad.write_bytes(f.read(20_000_000))
        want = "is truncated: tensor token_embd.weight needs bytes up to 31866688 but the file has 20000000 bytes"
    rc, out, err, took = _serve("--model", str(bad), "--port", str(free_port()))
    print(f"{kind} GGUF: exit {rc} after {took:.2f}s: {err.strip()}")
    assert rc == 2, out + err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {bad} {want}"), err
    assert "Traceback" not in out + err and "Uvicorn running" not in out + err and "Started server" not in out + err
    assert took < 30


def test_a_port_in_use_fails_at_once_before_the_model_loads():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        rc, out, err, took = _serve("--port", str(port))  # the default SmolLM2: seconds to load
    print(f"port in use: exit {rc} after {took:.2f}s: {err.strip()}")
    assert rc == 2, out + err
    assert (
        err.strip() == f"error: port {port} on 127.0.0.1 is already in use; stop what holds it or pick another --port"
    )
    assert "loaded" not in out + err and "engine ready" not in out + err and "Traceback" not in out + err
    assert took < 30


def test_two_servers_loading_on_one_port_one_fails_in_one_line(tiny_model_dir, tmp_path):
    """Both can bind while neither listens (SO_REUSEADDR): whichever listens second finds out then, and
    says so in one line with exit 2; the other serves."""
    port = str(free_port())
    cmd = [sys.executable, "-m", "membound.entrypoints.cli", "serve", *_args(tiny_model_dir, "--port", port)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "neither server stopped"
            time.sleep(0.1)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        out, err = loser.communicate(timeout=10)
        assert loser.returncode == 2, out + err
        # Its last line (it may have loaded, and logged that, before finding out at listen).
        assert err.strip().splitlines()[-1].startswith(f"error: port {port} on 127.0.0.1 is already in use"), err
        assert "Traceback" not in out + err
        while True:  # the other serves
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and winner.poll() is None
            time.sleep(0.2)
        winner.send_signal(signal.SIGTERM)
        assert winner.wait(60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=30)


@pytest.mark.parametrize(("flag", "value"), [("--max-request-body-mb", "nan"), ("--shutdown-timeout", "inf")])
def test_non_finite_server_flags_are_one_line_errors(flag, value):
    rc, out, err, _ = _serve(flag, value, "--port", str(free_port()))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), out + err


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_nothing_listens_while_the_model_loads_and_a_stop_then_exits_0():
    port = free_port()
    p = subprocess.Popen(
        [sys.executable, "-m", "membound.entrypoints.cli", "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out = bytearray()

    def read() -> None:
        while chunk := p.stdout.read1(4096):  # tqdm's bar ends in \r, not a newline: read bytes
            out.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while _port_is_free(port):  # serve binds the port, then loads the default SmolLM2 (seconds)
            assert p.poll() is None and time.monotonic() < deadline, out.decode(errors="replace")
            time.sleep(0.02)
        with pytest.raises(ConnectionRefusedError):  # bound, not listening: /health pollers keep polling
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        t = time.monotonic()
        p.send_signal(signal.SIGTERM)
        rc = p.wait(30)
        took = time.monotonic() - t
    finally:
        if p.poll() is None:
            p.kill()
        reader.join(10)
    log = out.decode(errors="replace")
    print(f"SIGTERM while loading: exit {rc} after {took:.2f}s")
    assert rc == 0 and took < 5, log
    assert "stopped while the model was loading" in log and "engine ready" not in log and "Traceback" not in log


def test_gguf_tensor_type_ids_it_does_not_know_are_named(tmp_path):
    import gguf

    from membound.errors import ModelLoadError
    from membound.model.loader import GGUFFile

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.odd", np.zeros(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = bytearray(path.read_bytes())
    at = data.index(b"blk.0.odd") + len(b"blk.0.odd") + 4 + 8  # name, n_dims (u32), one dim (u64), type (u32)
    data[at : at + 4] = (250).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"unsupported tensor type id 250 \(tensor blk\.0\.odd\)"):
        GGUFFile(str(path))
    data[at : at + 4] = (0).to_bytes(4, "little")  # F32 again, and the file cut inside the tensor's data
    path.write_bytes(bytes(data[:-16]))
    with pytest.raises(ModelLoadError, match=r"is truncated: tensor blk\.0\.odd needs bytes up to \d+ but the file"):
        GGUFFile(str(path))
