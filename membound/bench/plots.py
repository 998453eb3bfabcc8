"""PNG charts for `membound bench --plot DIR` (matplotlib, no display needed)."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from membound import costs  # noqa: E402


def _save(fig, path: pathlib.Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def latency_plots(result: dict, out_dir: str) -> list[str]:
    d = pathlib.Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    points = [p for p in result["decode"] if "skipped" not in p]
    title = f"{result['record'].get('model', '')} on {result['record'].get('device', '')}"
    files = []
    contexts = sorted({p["context"] for p in points})
    batches = sorted({p["batch"] for p in points})

    fig, ax = plt.subplots(figsize=(6, 4))
    for c in contexts:
        ps = sorted((p for p in points if p["context"] == c), key=lambda p: p["batch"])
        ax.plot([p["batch"] for p in ps], [p["tok_s"] for p in ps], marker="o", label=f"context {c}")
        ax.plot([p["batch"] for p in ps], [p["bound_tok_s"] for p in ps], linestyle=":", color=ax.lines[-1].get_color())
    ax.set(xscale="log", yscale="log", xlabel="batch (sequences)", ylabel="decode tok/s (aggregate)",
           title=f"decode vs batch (dotted: bound)\n{title}")  # fmt: skip
    ax.legend()
    files.append(_save(fig, d / "decode_vs_batch.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for b in batches:
        ps = sorted((p for p in points if p["batch"] == b), key=lambda p: p["context"])
        ax.plot([p["context"] for p in ps], [p["tok_s"] for p in ps], marker="o", label=f"batch {b}")
    ax.set(
        xscale="log", xlabel="context (tokens)", ylabel="decode tok/s (aggregate)", title=f"decode vs context\n{title}"
    )
    ax.legend()
    files.append(_save(fig, d / "decode_vs_context.png"))

    pre = [p for p in result["prefill"] if "skipped" not in p]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["prompt_len"] for p in pre], [p["ms"] for p in pre], marker="o")
    ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="prefill latency (ms)", title=f"prefill\n{title}")
    files.append(_save(fig, d / "prefill_latency.png"))

    files.append(roofline_plot(points, result["ceilings"], d / "roofline.png", title))
    return files


def roofline_plot(points: list[dict], ceilings: dict, path: pathlib.Path, title: str) -> str:
    """Achieved FLOP/s against arithmetic intensity, under min(peak, bandwidth x intensity)."""
    bw = ceilings["copy_bandwidth_gbs"] * costs.GB
    peak = ceilings["matmul_tflops"] * 1e12
    fig, ax = plt.subplots(figsize=(6, 4))
    ai = [p["flops_per_step"] / p["bytes_per_step"] for p in points]
    achieved = [p["flops_per_step"] / (p["step_ms"] / 1000) for p in points]
    lo, hi = min(ai + [peak / bw]) / 4, max(ai + [peak / bw]) * 4
    xs = [lo * (hi / lo) ** (i / 100) for i in range(101)]
    ax.plot(xs, [min(peak, bw * x) for x in xs], color="black", label="roofline (measured)")
    ax.scatter(ai, achieved, c="tab:red", label="decode points", zorder=3)
    for p, x, y in zip(points, ai, achieved, strict=True):
        ax.annotate(f"b{p['batch']}/c{p['context']}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP/byte)", ylabel="achieved FLOP/s",
           title=f"roofline\n{title}")  # fmt: skip
    ax.legend()
    return _save(fig, path)


def throughput_plot(result: dict, out_dir: str) -> list[str]:
    d = pathlib.Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(runs)
    ax.bar(names, [runs[n]["output_tok_s"] for n in names], color=["tab:blue", "tab:gray"][: len(names)])
    ax.set(ylabel="output tok/s", title=f"offline throughput, {runs[names[0]]['requests']} requests")
    return [_save(fig, d / "throughput.png")]


def serve_plot(rows: list[dict], out_dir: str) -> list[str]:
    d = pathlib.Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["concurrency"] for r in rows], [r["output_tok_s"] for r in rows], marker="o", label="aggregate")
    ax.plot([r["concurrency"] for r in rows], [r["per_user_tok_s"] for r in rows], marker="s", label="per user")
    ax.set(xscale="log", xlabel="concurrent users", ylabel="output tok/s", title="serving: users vs throughput")
    ax.legend()
    return [_save(fig, d / "serve_sweep.png")]


def walls_plot(result: dict, out_dir: str) -> list[str]:
    d = pathlib.Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    walls = [w for w in result["walls"] if w["ms"] is not None]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([w["wall"] for w in walls][::-1], [w["ms"] for w in walls][::-1])
    ax.axvline(result["step_ms"], color="black", linestyle=":", label=f"step {result['step_ms']:.2f} ms")
    ax.set(xlabel="ms per decode step", title="the walls of a decode step")
    ax.legend()
    return [_save(fig, d / "walls.png")]
