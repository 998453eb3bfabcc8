"""The `membound` command: generate and chat on the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator

from membound.config import EngineConfig
from membound.engine.llm_engine import LLMEngine
from membound.errors import ConfigError, InvalidRequestError, MemboundError
from membound.outputs import RequestOutput
from membound.sampling_params import SamplingParams


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=None,
        help="GGUF file, HF model folder, or preset (with --load-format dummy); "
        "default: the embedded SmolLM2-135M-Instruct Q4_1",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        help="auto, float32, float16 or bfloat16 (auto: bf16 on CUDA; on CPU bf16 for packed weights where "
        "the CPU has bf16 in hardware, else fp32)",
    )
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument(
        "--max-model-len",
        type=_int_or_auto,
        default=None,
        help="longest prompt + output (default: the model's); auto: the longest at which --target-concurrency "
        "sequences fit in the KV cache (with --kv-cache-dtype auto, a narrower KV precision if the run dtype "
        "cannot hold the model's full context)",
    )
    g.add_argument(
        "--target-concurrency",
        type=int,
        default=None,
        help="with --max-model-len auto: sequences that must fit at once at the chosen length (default 1)",
    )
    g.add_argument("--max-num-seqs", type=int, default=256, help="most requests in one batch")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    g.add_argument(
        "--long-prefill-token-threshold",
        type=int,
        default=None,
        help="prompt tokens per step while others decode, so their token rate stays steady "
        "(0: no cap; default for serve: 8 on CPU, 512 on CUDA)",
    )
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="share of GPU memory to use")
    g.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache budget in MiB (CPU default 2048)")
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"], help="dummy: random weights")
    g.add_argument("--seed", type=int, default=0, help="engine seed for unseeded sampling")
    g.add_argument(
        "--quantization",
        default="auto",
        choices=["auto", "gguf", "none", "int8", "int4", "fp8"],
        help="weight format: auto (gguf for a GGUF file, else none); gguf: run on the file's own quantized "
        "blocks, kept packed; none: dequantize everything to --dtype; int8/int4/fp8: quantize the decoder's "
        "weights at load (round-to-nearest; int4: groups of 128/64/32, a Q4 GGUF's own blocks)",
    )
    g.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "fp8", "int8"],
        help="KV cache precision: auto (the run dtype), fp8 (e4m3, scale 1: half of bf16's bytes) or "
        "int8 (a scale per token and head: ~53%% of bf16's bytes at head_dim 64)",
    )
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV of prompt prefixes already in the cache (default: on)",
    )
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="never replay decode steps from CUDA graphs (graphs are on by default on CUDA)",
    )
    g.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="schedule and launch step N+1 while step N runs on the device (default: on with CUDA)",
    )
    g.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="CPU threads for the model's ops (default: the cores this process may use, by affinity and "
        "cgroup quota, one fewer while another process keeps one busy)",
    )
    g.add_argument(
        "--batch-invariant",
        action="store_true",
        help="every token's logits the same whatever else runs in its step and however its prompt is "
        "chunked: a seeded request gives the same tokens alone or under load (CPU only; slower prefill)",
    )
    g.add_argument(
        "--speculative-config",
        type=_json_object,
        default=None,
        help='speculative decoding, as vLLM\'s: \'{"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_min": 2, "prompt_lookup_max": 4}\' (drafts from the sequence\'s own text; '
        "steps then run one at a time)",
    )
    g.add_argument(
        "--attention-backend",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="auto: the Triton kernels on CUDA, PyTorch elsewhere",
    )


def _int_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer or auto, got {text!r}") from None


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sample-seed", type=int, default=None, help="per-request seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def _engine(a: argparse.Namespace) -> LLMEngine:
    return LLMEngine(_engine_config(a))


def _engine_config(a: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=a.model,
        dtype=a.dtype,
        device=a.device,
        max_model_len=a.max_model_len,
        target_concurrency=a.target_concurrency,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        long_prefill_token_threshold=a.long_prefill_token_threshold,
        gpu_memory_utilization=a.gpu_memory_utilization,
        kv_cache_memory_bytes=None if a.kv_cache_memory is None else a.kv_cache_memory << 20,
        load_format=a.load_format,
        seed=a.seed,
        enable_prefix_caching=a.enable_prefix_caching,
        quantization=a.quantization,
        kv_cache_dtype=a.kv_cache_dtype,
        enforce_eager=a.enforce_eager,
        async_scheduling=a.async_scheduling,
        attention_backend=a.attention_backend,
        num_threads=a.num_threads,
        batch_invariant=a.batch_invariant,
        speculative_config=a.speculative_config,
    )


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text[:80]!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text[:80]!r}")
    return value


def _mib_to_bytes(mib: float, flag: str) -> int:
    if not math.isfinite(mib) or mib <= 0:
        raise ConfigError(f"{flag} must be a positive number of MiB, got {mib!r}")
    return round(mib * 2**20)


def cmd_serve(a: argparse.Namespace) -> int:
    from membound.server import ServerConfig, run, run_models
    from membound.server.models import parse_models, plan_models

    tags = list(a.model_tag)
    if a.model is not None:
        if tags and tags != [a.model]:
            raise ConfigError(
                f"two models given ({' '.join(map(repr, tags))} and --model {a.model!r}); give one, "
                "or several as MODEL arguments"
            )
        tags = [a.model]
    a.model = None
    server = ServerConfig(
        host=a.host,
        port=a.port,
        served_model_names=tuple(a.served_model_name or ()),
        api_key=a.api_key,
        max_queued_requests=a.max_queued_requests,
        log_interval=a.log_interval,
        shutdown_timeout=a.shutdown_timeout,
        max_request_body_bytes=_mib_to_bytes(a.max_request_body_mb, "--max-request-body-mb"),
        tool_call_parser=a.tool_call_parser,
    )
    from membound.server.replicas import check_replica_flags

    check_replica_flags(a.replicas, a.ray_address, a.routing)
    specs = parse_models(tags, a.served_model_name, a.model_option, a.load_format)
    planned, budget = plan_models(specs, _engine_config(a), a.max_loaded_models)
    if a.replicas is not None:
        from membound.server.replicas import ReplicaConfig, run_replicas

        if len(planned) != 1:
            raise ConfigError("--replicas serves one model; give one MODEL")
        replicas = ReplicaConfig(
            a.replicas, a.ray_address, a.routing or "prefix", imbalance_threshold=a.routing_imbalance_threshold
        )
        server.served_model_names = planned[0].names
        return run_replicas(planned[0].config, server, replicas)
    if len(planned) == 1:
        server.served_model_names = planned[0].names
        return run(planned[0].config, server)
    return run_models(planned, budget, server)


def _local_device_spec(cpu: bool = False):
    """The GPU here (from the table, else from torch + a measurement), or the CPU, measured."""
    import torch

    from membound.plan.ceilings import measure
    from membound.plan.gpus import GPUSpec, match_device_name

    if torch.cuda.is_available() and not cpu:
        name = torch.cuda.get_device_name(0)
        spec = match_device_name(name)
        if spec is not None:
            return spec
        c = measure("cuda", quick=True)
        total = torch.cuda.get_device_properties(0).total_memory
        return GPUSpec(f"{name} (measured)", total / 2**30, c.copy_bandwidth_gbs, c.matmul_tflops, None, 0)
    c = measure("cpu", quick=True)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return GPUSpec(
        f"CPU (measured, {os.cpu_count()} cores)", ram / 2**30, c.copy_bandwidth_gbs, c.matmul_tflops, None, 0, cpu=True
    )


def cmd_plan(a: argparse.Namespace) -> int:
    from membound.plan.gpus import get_gpu
    from membound.plan.planner import load_shape, make_plan, render

    shape = load_shape(a.model, a.weights)
    spec = _local_device_spec(cpu=a.gpu == "cpu") if a.gpu in ("auto", "cpu") else get_gpu(a.gpu)
    context = a.context or min(shape.config.max_position_embeddings, 8192)
    plan = make_plan(
        shape,
        spec,
        context,
        a.concurrency,
        kv_dtype=a.kv_dtype,
        gpu_memory_utilization=a.gpu_memory_utilization,
        overhead_bytes=int(a.overhead_gib * 2**30),
        kv_cache_memory_bytes=None if a.kv_cache_memory is None else a.kv_cache_memory << 20,
        block_size=a.block_size,
    )
    print(json.dumps(plan.to_dict(), indent=2) if a.json else render(plan, shape))
    return 0


def cmd_doctor(a: argparse.Namespace) -> int:
    from membound.plan import doctor

    checks = doctor.run(a.model, context=a.context, decode=not a.no_decode)
    if a.json:
        print(
            json.dumps({"checks": [dataclasses.asdict(c) for c in checks], "verdict": doctor.worst(checks)}, indent=2)
        )
    else:
        print(doctor.render(checks))
    return 0


def cmd_tokenizer_export(a: argparse.Namespace) -> int:
    import pathlib

    from membound.model.loader import load_config, open_gguf, resolve_model
    from membound.model.tokenizer import Tokenizer

    out = pathlib.Path(a.dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not a.force:
        raise ConfigError(f"{out} exists and is not empty; pick another folder or pass --force to write into it")
    source = resolve_model(a.model)  # a GGUF file or a HF folder (presets carry no tokenizer)
    tok = Tokenizer.from_model_path(source.path)
    try:  # the model's context length (from the header), where transformers would say 1e30
        max_len = load_config(source, open_gguf(source)).max_position_embeddings
    except MemboundError:
        max_len = None
    try:
        files = tok.export(out, model_max_length=max_len)
    except OSError as e:
        raise ConfigError(f"cannot write the tokenizer to {out}: {e.strerror or e}") from None
    print(f"wrote {', '.join(files)} to {out}; load it with transformers.AutoTokenizer.from_pretrained({str(out)!r})")
    return 0


def _params(a: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        min_p=a.min_p,
        repetition_penalty=a.repetition_penalty,
        seed=a.sample_seed,
        stop=a.stop,
        ignore_eos=a.ignore_eos,
    )


def stream(engine: LLMEngine, request_id: str, prompt, params: SamplingParams) -> Iterator[RequestOutput]:
    """Yield one request's outputs step by step (`delta_text` holds the new text)."""
    engine.add_request(request_id, prompt, params)
    try:
        while True:
            for out in engine.step():
                if out.request_id == request_id:
                    yield out
                    if out.finished:
                        return
    finally:
        engine.abort_request(request_id)  # no-op when finished; frees blocks on Ctrl-C


def cmd_generate(a: argparse.Namespace) -> int:
    engine = _engine(a)
    params = _params(a)
    prompt = a.prompt
    if a.chat_template:
        _require_tokenizer(engine)
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": a.prompt}])
    else:
        print(a.prompt, end="", flush=True)
    t0 = time.perf_counter()
    last = None
    for out in stream(engine, "cli-0", prompt, params):
        print(out.delta_text, end="", flush=True)
        last = out
    dt = time.perf_counter() - t0
    print()
    n = len(last.outputs[0].token_ids)
    ttft = last.metrics.time_to_first_token or 0.0
    decode = (n - 1) / (dt - ttft) if n > 1 and dt > ttft else 0.0
    print(
        f"[{n} tokens in {dt:.2f}s: first token {ttft * 1000:.0f} ms, decode {decode:.1f} tok/s; "
        f"finish: {last.outputs[0].finish_reason}]",
        file=sys.stderr,
    )
    return 0


def _require_tokenizer(engine: LLMEngine) -> None:
    if engine.tokenizer is None:
        raise InvalidRequestError("this model has no tokenizer (dummy weights?); chat templates need one")


def cmd_chat(a: argparse.Namespace) -> int:
    engine = _engine(a)
    _require_tokenizer(engine)
    params = _params(a)
    messages: list[dict[str, str]] = []
    if a.system:
        messages.append({"role": "system", "content": a.system})
    print("membound chat: type a message; /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if a.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = engine.tokenizer.apply_chat_template(messages)
        reply = []
        try:
            for out in stream(engine, f"chat-{turn}", ids, params):
                reply.append(out.delta_text)
                print(out.delta_text, end="", flush=True)
        except KeyboardInterrupt:
            pass
        except InvalidRequestError as e:  # e.g. the history outgrew max_model_len
            print(f"error: {e}; /reset starts over", file=sys.stderr)
            messages.pop()
            continue
        print()
        turn += 1
        messages.append({"role": "assistant", "content": "".join(reply)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="membound", description="LLM inference for one GPU, built on memory bandwidth"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete one prompt, streaming the output")
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--chat-template", action="store_true", help="wrap the prompt in the model's chat template")
    _engine_args(g)
    _sampling_args(g, max_tokens=64)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="an interactive chat that streams replies")
    c.add_argument("--system", default=None, help="system prompt")
    _engine_args(c)
    _sampling_args(c, max_tokens=512)
    c.set_defaults(func=cmd_chat)
    s = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /metrics)",
        description="Serve a model over an OpenAI-compatible API. Any OpenAI client works: "
        "base_url=http://HOST:PORT/v1. Engine flags are named as in vLLM.",
    )
    s.add_argument(
        "model_tag",
        nargs="*",
        default=[],
        metavar="MODEL",
        help="same as --model; several (PATH or NAME=PATH each) are served by one process, a request going "
        "to the model its 'model' field names (default: the first); each gets a share of the memory budget "
        "(--model-option NAME share=F; default: equal parts)",
    )
    _engine_args(s)
    g = s.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    g.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="name(s) clients use in the 'model' field; the first is reported (default: the model file name)",
    )
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 and tokenizer routes")
    g.add_argument(
        "--max-queued-requests",
        type=int,
        default=1024,
        help="waiting requests beyond this are refused with 429 and Retry-After (default 1024)",
    )
    g.add_argument("--log-interval", type=float, default=5.0, help="seconds between stats log lines while busy")
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds in-flight requests may take to finish; then they are aborted (streams end with "
        "finish_reason 'abort' and [DONE], other requests get a 503 error) (default 30)",
    )
    g.add_argument(
        "--max-request-body-mb",
        type=float,
        default=4.0,
        help="request bodies larger than this many MiB are refused with 413 (default 4)",
    )
    g.add_argument(
        "--tool-call-parser",
        choices=("auto", "hermes", "llama3_json", "mistral"),
        default="auto",
        help="how tool calls are read from the output with tool_choice auto: hermes (Qwen, and templates without "
        "tools), llama3_json or mistral; auto picks the format the model's chat template writes (default)",
    )
    g = s.add_argument_group("several models")
    g.add_argument(
        "--model-option",
        nargs="+",
        action="append",
        default=None,
        metavar=("NAME", "KEY=VALUE"),
        help="settings of one model, repeatable: share (fraction of the memory budget: of "
        "--gpu-memory-utilization on CUDA, of the KV budget on CPU or with --kv-cache-memory), max_model_len, "
        "max_num_seqs, max_num_batched_tokens, target_concurrency, kv_cache_memory (MiB); other engine flags "
        "apply to every model",
    )
    g.add_argument(
        "--max-loaded-models",
        type=int,
        default=None,
        metavar="K",
        help="at most K models loaded at once: beyond that the least recently used idle one sleeps (KV cache "
        "freed, weights moved to pinned host memory on CUDA) and wakes on its next request (default: all)",
    )
    g = s.add_argument_group("replicas (Ray Serve; pip install membound[ray])")
    g.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="run N engine replicas as a Ray Serve application behind this server's routes (one GPU each on "
        "CUDA); Ray starts locally unless --ray-address joins a cluster (default: one engine, no Ray)",
    )
    g.add_argument("--ray-address", default=None, help="with --replicas: the Ray cluster to join (HOST:6379, auto)")
    g.add_argument(
        "--routing",
        choices=("prefix", "pow2", "round-robin"),
        default=None,
        help="with --replicas: prefix (the replica holding the longest prefix of the prompt's block hashes, unless "
        "its queue is --routing-imbalance-threshold longer than the shortest; default), pow2 (power of two "
        "choices on queue length) or round-robin",
    )
    g.add_argument(
        "--routing-imbalance-threshold",
        type=int,
        default=4,
        metavar="Q",
        help="with --routing prefix: queue-length lead past which a prefix match is ignored (default 4)",
    )
    s.set_defaults(func=cmd_serve)
    pl = sub.add_parser(
        "plan",
        help="what fits on a GPU and how fast decode can be (arithmetic, no GPU needed)",
        description="Weights, KV cache per token (GQA-aware), fit and headroom at a context and concurrency, "
        "decode tok/s bounds (bandwidth incl. KV reads vs compute) for batch 1..256, prefill estimate.",
    )
    pl.add_argument("model", nargs="?", default=None, help="preset name, GGUF file (header only) or HF folder")
    pl.add_argument("--gpu", default="auto", help="a GPU from the table (e.g. h100-sxm, rtx-4090), auto, or cpu")
    pl.add_argument(
        "--context",
        type=_int_or_auto,
        default=None,
        help="tokens per sequence (default: min(model max, 8192)); auto: the longest at which --concurrency "
        "sequences fit, as the engine's --max-model-len auto --target-concurrency chooses it",
    )
    pl.add_argument("--concurrency", type=int, default=1, help="sequences held at once")
    pl.add_argument(
        "--weights",
        default=None,
        help="bf16, fp16, fp8, int8, int4 or a GGUF type (Q8_0, Q4_K, ...); default: as stored",
    )
    pl.add_argument(
        "--kv-dtype", default="auto", help="auto (as the engine: fp32 on a CPU, else bf16), fp32, bf16, fp16, fp8, int8"
    )
    pl.add_argument(
        "--kv-cache-memory",
        type=int,
        default=None,
        help="KV cache budget in MiB, as `serve --kv-cache-memory` (default: what the engine would take)",
    )
    pl.add_argument("--block-size", type=int, default=16, help="tokens per KV block, as the engine's block_size")
    pl.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    pl.add_argument("--overhead-gib", type=float, default=1.0, help="CUDA context, activations, graphs (default 1)")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)
    d = sub.add_parser("doctor", help="why is it slow? checks the GPU, drivers, clocks, fit and a real decode")
    d.add_argument("model", nargs="?", default=None, help="model to check (default: the embedded SmolLM2)")
    d.add_argument("--context", type=int, default=4096, help="context the fit check assumes")
    d.add_argument("--no-decode", action="store_true", help="skip loading the model for a short decode")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_doctor)
    t = sub.add_parser("tokenizer", help="the model's tokenizer: export it as a HF folder")
    tsub = t.add_subparsers(dest="tokenizer_command", required=True)
    te = tsub.add_parser(
        "export",
        help="write the model's tokenizer as a HF folder (tokenizer.json, tokenizer_config.json with the chat "
        "template) that transformers.AutoTokenizer.from_pretrained loads",
    )
    te.add_argument("dir", metavar="DIR", help="folder to write (created; must be empty unless --force)")
    te.add_argument("--model", default=None, help="GGUF file or HF model folder (default: the embedded SmolLM2)")
    te.add_argument("--force", action="store_true", help="write into a non-empty folder, replacing tokenizer files")
    te.set_defaults(func=cmd_tokenizer_export)
    from membound.bench.cli import add_bench_parser

    add_bench_parser(sub, _engine_args, _engine_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except MemboundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
