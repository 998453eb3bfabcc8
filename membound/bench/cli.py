"""`membound bench latency | throughput | serve | walls`: argument parsing and output."""

from __future__ import annotations

import argparse
import dataclasses

from membound.bench import common


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-json", default=None, help="write every number (and the run's record) here")
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNG charts into DIR")
    p.add_argument("--no-progress", action="store_true")


def add_bench_parser(sub, engine_args, engine_config) -> None:
    b = sub.add_parser("bench", help="measure: latency grid, offline throughput, a server under load, the walls")
    bs = b.add_subparsers(dest="bench_command", required=True)

    lat = bs.add_parser(
        "latency", help="prefill latency ladder; decode tok/s over batch x context, with roofline share"
    )
    lat.add_argument("model_tag", nargs="?", default=None, metavar="MODEL")
    lat.add_argument("--prompt-lens", type=_ints, default=None, help="e.g. 128,512,2048")
    lat.add_argument("--batches", type=_ints, default=None, help="e.g. 1,4,16,64,128")
    lat.add_argument("--contexts", type=_ints, default=None, help="e.g. 512,4096,16384,32768 (capped by what fits)")
    lat.add_argument("--decode-steps", type=int, default=16)
    lat.add_argument("--remeasure", action="store_true", help="measure the device ceilings again")
    engine_args(lat)
    _common(lat)
    lat.set_defaults(func=lambda a: cmd_latency(a, engine_config))

    tp = bs.add_parser("throughput", help="offline throughput on a workload; --compare hf for a side-by-side ratio")
    tp.add_argument("model_tag", nargs="?", default=None, metavar="MODEL")
    tp.add_argument("--num-prompts", type=int, default=256)
    tp.add_argument("--input-len", type=_ints, default=(100, 1024), help="MIN,MAX uniform (default 100,1024)")
    tp.add_argument("--output-len", type=_ints, default=(100, 1024), help="MIN,MAX uniform (default 100,1024)")
    tp.add_argument("--dataset", default=None, help="JSONL ({'prompt', 'output_len'}) or ShareGPT JSON")
    tp.add_argument("--compare", choices=["hf"], default=None, help="also run HF transformers on the same weights")
    tp.add_argument("--hf-batch-size", type=int, default=16)
    engine_args(tp)
    _common(tp)
    tp.set_defaults(func=lambda a: cmd_throughput(a, engine_config))

    sv = bs.add_parser("serve", help="load an OpenAI-compatible server (membound, vLLM, llama-server)")
    sv.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    sv.add_argument("--served-model", default=None, help="model name to send (default: the first of /v1/models)")
    sv.add_argument("--api-key", default=None)
    sv.add_argument("--concurrency", type=_ints, default=(1, 4, 8, 32), help="users; several values make a sweep")
    sv.add_argument(
        "--request-rate", type=float, default=None, help="Poisson arrivals per second (default: closed loop)"
    )
    sv.add_argument("--num-prompts", type=int, default=None, help="per concurrency (default 4 x users, at least 8)")
    sv.add_argument("--input-words", type=int, default=128, help="prompt length in random words")
    sv.add_argument("--output-len", type=int, default=128)
    sv.add_argument("--goodput", nargs="*", default=None, metavar="SLO", help="ttft:MS tpot:MS e2e:MS")
    sv.add_argument("--seed", type=int, default=0)
    _common(sv)
    sv.set_defaults(func=cmd_serve)

    ql = bs.add_parser("quality", help="KL divergence and top-1 agreement of quantized variants vs full precision")
    ql.add_argument("model_tag", nargs="?", default=None, metavar="MODEL")
    ql.add_argument(
        "--formats", default="int8,int4,fp8", help="comma-separated: int8, int4, fp8, gguf (a GGUF file's own blocks)"
    )
    ql.add_argument("--tokens", type=int, default=256, help="length of the reference text the model writes")
    ql.add_argument("--text-seed", type=int, default=1)
    engine_args(ql)
    _common(ql)
    ql.set_defaults(func=lambda a: cmd_quality(a, engine_config))

    wl = bs.add_parser("walls", help="where one decode step goes: host, launches, memory, compute")
    wl.add_argument("model_tag", nargs="?", default=None, metavar="MODEL")
    wl.add_argument("--batch", type=int, default=1)
    wl.add_argument("--context", type=int, default=128)
    wl.add_argument("--steps", type=int, default=16)
    wl.add_argument("--remeasure", action="store_true")
    engine_args(wl)
    _common(wl)
    wl.set_defaults(func=lambda a: cmd_walls(a, engine_config))


def _engine(a, engine_config, max_len: int | None, tokenizer: bool = False):
    from membound.engine.llm_engine import LLMEngine

    a.model = a.model_tag or a.model
    if a.max_model_len is None and max_len is not None:
        a.max_model_len = max_len
    # Benchmarks send token ids; a tokenizer is only loaded for text datasets.
    return LLMEngine(dataclasses.replace(engine_config(a), skip_tokenizer_init=not tokenizer))


def _finish(a, result: dict, text: str, plotter) -> int:
    print(text)
    common.write_json(a.output_json, result)
    if a.plot:
        for f in plotter(result, a.plot):
            print(f"wrote {f}")
    return 0


def cmd_latency(a, engine_config) -> int:
    import torch

    from membound.bench import latency, plots

    probe = latency.LatencyConfig.default(
        torch.device("cuda" if torch.cuda.is_available() and a.device != "cpu" else "cpu")
    )
    cfg = latency.LatencyConfig(
        a.prompt_lens or probe.prompt_lens, a.batches or probe.batches, a.contexts or probe.contexts, a.decode_steps
    )
    longest = max(max(cfg.contexts) + cfg.decode_steps + 2, max(cfg.prompt_lens) + 1)
    engine = _engine(a, engine_config, longest)
    ceil = common.device_ceilings(engine.device, engine.dtype, a.remeasure)
    before = engine.stats()
    with common.NvmlSampler(engine.device) as nvml:
        out = latency.run(engine, cfg, ceil, progress=not a.no_progress)
    if engine.config.speculative_config is not None:
        from membound.bench.throughput import spec_stats

        out["speculative"] = spec_stats(before, engine.stats())
    result = {"record": common.run_record(engine), "ceilings": dataclasses.asdict(ceil), **out, "nvml": nvml.summary()}
    text = [
        f"{result['record']['model']} ({result['record']['dtype']}) on {result['record']['device']}: "
        f"copy bandwidth {ceil.copy_bandwidth_gbs:,.1f} GB/s, matmul {ceil.matmul_tflops * 1000:,.0f} GFLOPS",
        "",
        "prefill",
        common.table(out["prefill"], [("prompt_len", "prompt", "d"), ("ms", "ms", ",.1f"), ("tok_s", "tok/s", ",.0f")]),
        "",
        "decode",
        common.table(
            out["decode"],
            [
                ("batch", "batch", "d"),
                ("context", "context", "d"),
                ("tok_s", "tok/s", ",.1f"),
                ("per_request_tok_s", "per req", ",.1f"),
                ("bytes_per_step", "bytes/step", ",.0f"),
                ("achieved_gbs", "GB/s", ",.1f"),
                ("roofline_share", "roofline", ".0%"),
                ("bound_tok_s", "bound tok/s", ",.0f"),
                ("headroom_bytes", "headroom B", ",.0f"),
            ],
        ),  # fmt: skip
    ]
    if "speculative" in out:
        sp = out["speculative"]
        mal = sp["mean_acceptance_length"]
        text.append(
            f"speculative decoding: {sp['spec_drafting_steps']} drafting steps, mean acceptance length "
            + (f"{mal:.2f}" if mal is not None else "- (no drafts: random prompts rarely repeat)")
        )
    skipped = [p for p in out["decode"] if "skipped" in p]
    if skipped:
        text.append(f"skipped {len(skipped)} points that do not fit, e.g. {skipped[0]['skipped']}")
    if result["nvml"] and result["nvml"]["throttled"]:
        text.append(f"WARNING: the GPU throttled during the run: {result['nvml']}")
    return _finish(a, result, "\n".join(text), plots.latency_plots)


def cmd_throughput(a, engine_config) -> int:
    from membound.bench import plots, throughput

    need = max(a.input_len) + max(a.output_len) + 1
    engine = _engine(a, engine_config, None if a.dataset else need, tokenizer=throughput.needs_tokenizer(a.dataset))
    if a.dataset:
        work = throughput.file_workload(a.dataset, engine, a.num_prompts)
    else:
        lo_in, hi_in = (a.input_len * 2)[:2] if len(a.input_len) == 1 else a.input_len[:2]
        lo_out, hi_out = (a.output_len * 2)[:2] if len(a.output_len) == 1 else a.output_len[:2]
        work = throughput.random_workload(
            a.num_prompts, (lo_in, hi_in), (lo_out, hi_out), engine.model_config.vocab_size, engine.config.seed
        )
    runs = {"membound": throughput.run_membound(engine, work, not a.no_progress)}
    if a.compare == "hf":
        from membound.bench.hf import hf_twin

        runs["hf"] = throughput.run_hf(hf_twin(engine), work, a.hf_batch_size, engine.device, not a.no_progress)
    result = {"record": common.run_record(engine, workload=a.dataset or "random"), "runs": runs}
    if "hf" in runs:
        result["ratio_output_tok_s"] = runs["membound"]["output_tok_s"] / runs["hf"]["output_tok_s"]
    rows = [{"engine": k, **v} for k, v in runs.items()]
    text = common.table(
        rows,
        [("engine", "engine", "s"), ("requests", "requests", "d"), ("elapsed_s", "seconds", ",.1f"),
         ("output_tok_s", "output tok/s", ",.1f"), ("total_tok_s", "total tok/s", ",.1f"),
         ("requests_per_s", "req/s", ",.2f")],
    )  # fmt: skip
    if "ratio_output_tok_s" in result:
        text += f"\nmembound / hf output tok/s: {result['ratio_output_tok_s']:.2f}x"
    m = runs["membound"]
    if m.get("spec_drafting_steps") is not None:
        mal = m["mean_acceptance_length"]
        text += (
            f"\nspeculative decoding: {m['spec_drafting_steps']} drafting steps, {m['spec_accepted_tokens']} of "
            f"{m['spec_draft_tokens']} drafts accepted, mean acceptance length {mal:.2f}"
            if mal is not None
            else "\nspeculative decoding: no drafts (nothing matched, or drafting did not pay)"
        )
    return _finish(a, result, text, plots.throughput_plot)


def cmd_serve(a) -> int:
    from membound.bench import plots, serving

    slo = serving.parse_goodput(a.goodput)
    rows = serving.run(
        a.base_url, list(a.concurrency), a.num_prompts, a.input_words, a.output_len, a.request_rate, slo,
        a.api_key, a.served_model, a.seed,
    )  # fmt: skip
    result = {"record": common.run_record(base_url=a.base_url, slo_s=slo, request_rate=a.request_rate), "runs": rows}
    flat = [
        {**r, "ttft_p50": r["ttft_ms"]["median"], "ttft_p99": r["ttft_ms"]["p99"], "tpot_p50": r["tpot_ms"]["median"],
         "itl_p99": r["itl_ms"]["p99"], "e2e_p50": r["e2e_ms"]["median"]}
        for r in rows
    ]  # fmt: skip
    text = common.table(
        flat,
        [("concurrency", "users", "d"), ("requests", "requests", "d"), ("failed", "failed", "d"),
         ("output_tok_s", "tok/s", ",.1f"), ("per_user_tok_s", "tok/s/user", ",.1f"),
         ("request_throughput", "req/s", ",.2f"), ("goodput", "goodput req/s", ",.2f"),
         ("ttft_p50", "TTFT p50 ms", ",.0f"), ("ttft_p99", "TTFT p99 ms", ",.0f"),
         ("tpot_p50", "TPOT p50 ms", ",.1f"), ("itl_p99", "ITL p99 ms", ",.1f"), ("e2e_p50", "e2e p50 ms", ",.0f")],
    )  # fmt: skip
    errors = sorted({e for r in rows for e in r["errors"]})
    if errors:
        text += "\nerrors: " + "; ".join(errors[:3])
    return _finish(a, result, text, lambda res, d: plots.serve_plot(res["runs"], d))


def cmd_quality(a, engine_config) -> int:
    from membound.bench import quality
    from membound.errors import ConfigError

    formats = [f for f in a.formats.split(",") if f]
    bad = [f for f in formats if f not in ("int8", "int4", "fp8", "gguf")]
    if bad or not formats:
        raise ConfigError(f"--formats takes int8, int4, fp8, gguf (comma-separated), got {a.formats!r}")
    if a.quantization not in (None, "auto"):
        raise ConfigError("bench quality compares formats itself; leave out --quantization")
    a.model = a.model_tag or a.model
    if a.max_model_len is None:
        a.max_model_len = a.tokens + 16

    def make(fmt):
        from membound.engine.llm_engine import LLMEngine

        return LLMEngine(dataclasses.replace(engine_config(a), skip_tokenizer_init=True, quantization=fmt))

    out = quality.run(make, formats, a.tokens, a.text_seed)
    engine = out.pop("_engine")
    result = {"record": common.run_record(engine), **out}
    text = (
        f"{out['tokens']} tokens of text written by the reference ({result['record']['dtype']}), seed {a.text_seed}\n"
    )
    text += common.table(
        out["rows"],
        [("format", "format", "s"), ("weight_bytes_per_step", "bytes/step", ",.0f"), ("mean_kl", "mean KL", ".5f"),
         ("max_kl", "max KL", ".4f"), ("top1_agreement", "top-1 agree", ".1%")],
    )  # fmt: skip
    return _finish(a, result, text, lambda res, d: [])


def cmd_walls(a, engine_config) -> int:
    from membound.bench import plots, walls

    engine = _engine(a, engine_config, a.context + a.steps + 8)
    ceil = common.device_ceilings(engine.device, engine.dtype, a.remeasure)
    out = walls.run(engine, ceil, a.batch, a.context, a.steps)
    result = {"record": common.run_record(engine), "ceilings": dataclasses.asdict(ceil), **out}
    text = (
        f"{result['record']['model']} on {result['record']['device']}, batch {a.batch}, context {a.context}: "
        f"{out['step_ms']:.2f} ms per step, {out['tok_s']:,.1f} tok/s"
        + (f", {out['ops_per_step']:,} PyTorch ops per step" if out.get("ops_per_step") else "")
        + "\n"
        + common.table(
            out["walls"],
            [("wall", "wall", "s"), ("ms", "ms/step", ",.3f"), ("share_of_step", "of step", ".1%"), ("what", "", "s")],
        )
    )
    return _finish(a, result, text, plots.walls_plot)
