"""Summaries of the raw runs: medians per system and size, the U-Net bound, a Markdown table and a chart."""

from __future__ import annotations

import statistics
from pathlib import Path

from worker import FIGURES
LABELS = {"text_encoder": "text enc 2x77", "unet_b2": "U-Net b2", "unet_b1": "U-Net b1", "vae_decode": "VAE dec",
          "vae_encode": "VAE enc", "txt2img": "txt2img"}


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else {}


def bounds(report: dict, size: int, batch: int) -> dict:
    """Seconds of the fastest possible U-Net call: all FLOPs at the fp32 peak; for int8, matmuls at the int8 peak
    and convolutions at the fp32 peak (dynamic int8 quantizes MatMul/Gemm only), and everything at int8."""
    flops = report.get("unet_flops", {}).get(f"{size}x{batch}")
    peak = report.get("matmul_peak")
    if not flops or not peak:  # (the GPU benchmark measures no CPU peak)
        return {}
    fp32 = max(peak["fp32"], peak.get("numpy_fp32", 0.0))
    out = {"fp32": flops["total"] / fp32, "int8_matmul_fp32_conv": flops["conv"] / fp32 + flops["matmul"] / peak["int8"],
           "int8_all": flops["total"] / peak["int8"]}
    if "conv_kept_float_by_qdq" in flops:  # static QDQ: convolutions int8 too, but those it keeps float
        kept = flops["conv_kept_float_by_qdq"]
        out["int8_qdq"] = kept / fp32 + (flops["total"] - kept) / peak["int8"]
    if "openvino_default" in peak:  # OpenVINO's kernels: its default float precision (bf16 here), the best int8
        return {**out, **_openvino_bounds(flops, peak, fp32)}
    return out


def _openvino_bounds(flops: dict, peak: dict, fp32: float) -> dict:
    """Bounds of the systems on OpenVINO's kernels: every FLOP at its default float peak; NNCF's hybrid int8
    (convolutions int8, linear layers and attention float: weights compressed only), at its default precision and
    at f32; our `openvino` scheme (all int8 but the layers it keeps float and the attention's products)."""
    default, int8 = peak["openvino_default"], max(peak["int8"], peak.get("openvino_int8", 0.0))
    out = {"openvino_default": flops["total"] / default,
           "openvino_hybrid_int8": flops["conv"] / int8 + flops["matmul"] / default,
           "openvino_hybrid_int8_f32": flops["conv"] / int8 + flops["matmul"] / fp32}
    if "float_by_openvino_scheme" in flops:
        kept = flops["float_by_openvino_scheme"]
        out["openvino_scheme"] = kept / default + (flops["total"] - kept) / int8
    return out


def _bound_for(system: str, b: dict) -> float | None:
    if system.startswith("sdcpp"):  # ggml's q8_0 and f16 kernels: no bound of ours fits
        return None
    if system.startswith("openvino"):  # its IRs: fp32/fp16 and weight-only int8 compute in its float precision
        hybrid = system.startswith("openvino-int8") and not system.startswith("openvino-int8w")
        f32 = system.endswith("-f32")
        return b.get(("openvino_hybrid_int8" + ("_f32" if f32 else "")) if hybrid else
                     ("fp32" if f32 else "openvino_default"))
    if "-ov" in system:  # ours on OpenVINO's kernels (--provider openvino): its float parts run in bf16 there
        return b.get("openvino_scheme" if "int8" in system else "openvino_default")
    if "qdq" in system:
        return b.get("int8_qdq")
    return b.get("int8_matmul_fp32_conv" if "int8" in system else "fp32")


def summarize(report: dict) -> dict:
    """{size: {system: {figure: stats, step: stats, peak_rss_mb: max, load_s: median, unet_b2_of_bound: ...}}}"""
    out: dict = {}
    for res in report["runs"]:
        if "error" in res:
            continue
        cell = out.setdefault(str(res["size"]), {}).setdefault(res["system"], {"_runs": []})
        cell["_runs"].append(res)
    for size, systems in out.items():
        b2, b1 = bounds(report, int(size), 2), bounds(report, int(size), 1)
        for system, cell in systems.items():
            runs = cell.pop("_runs")
            for fig in FIGURES:
                cell[fig] = _stats([t for r in runs for t in r["times_s"].get(fig, [])])
            # the first interval also encodes the prompts, so a step is the time between consecutive callbacks
            gens = [g for r in runs for g in (r.get("generations") or [r["step_s"]])]  # (older runs: one each)
            cell["step"] = _stats([t for g in gens for t in g[1:]])
            # with a step cache the steps differ (full / cached): the mean over ALL intervals of a run (the first
            # one, which also encodes the prompts, included), then the median over runs, is the per-step cost
            cell["step_mean"] = _stats([statistics.fmean(r["step_s"]) for r in runs if r["step_s"]])
            k = max(r.get("cache_interval", 1) for r in runs)
            if k > 1:
                cell["cache_interval"] = k
                cell["step_full"] = _stats([t for g in gens for j, t in enumerate(g) if j and j % k == 0])
                cell["step_cached"] = _stats([t for g in gens for j, t in enumerate(g) if j % k])
            cell["low_memory"] = any(r.get("low_memory") for r in runs)
            precision = sorted({r["inference_precision"] for r in runs if r.get("inference_precision")})
            if precision:  # OpenVINO: what its compiled U-Net really ran at (its default follows the CPU)
                cell["inference_precision"] = ", ".join(precision)
            cell["load_s"] = statistics.median(r["load_s"] for r in runs)
            cell["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
            gpu = [r["gpu_mem_mb"] for r in runs if r.get("gpu_mem_mb") is not None]
            if gpu:  # what the process added to the device's used memory: the arena keeps its peak
                cell["gpu_mem_mb"] = max(gpu)
            cell["runs"] = len(runs)
            for fig, b in (("unet_b2", b2), ("unet_b1", b1)):
                bound = _bound_for(system, b)
                if bound and cell[fig]:
                    cell[f"{fig}_bound_s"] = bound
                    cell[f"{fig}_efficiency"] = bound / cell[fig]["median"]  # 1.0 = at the machine's peak
            # a cached step skips most of the U-Net, so against the full call's bound only full steps count
            full = cell.get("step_full") or cell["step"]
            if cell.get("unet_b2_bound_s") and full:
                cell["step_efficiency"] = cell["unet_b2_bound_s"] / full["median"]
    return out


def _ms(x: float) -> str:
    return f"{x * 1000:.0f}" if x >= 0.1 else f"{x * 1000:.1f}"


def markdown(report: dict) -> str:
    s = report["summary"]
    m = report["machine"]
    peak = report["matmul_peak"]
    lines = [f"# Benchmark `{report['name']}`: {report['weights']} weights, {report['settings']['steps']}-step txt2img",
             "",
             f"Machine: {m.get('cpu')}, {m.get('physical_cores')} physical cores ({m.get('logical_cpus')} logical), "
             f"{m.get('memory_gb')} GB; flags {', '.join(m.get('flags', []))}.  ",
             f"onnxruntime {m['onnxruntime']}, torch {m['torch']}, diffusers {m['diffusers']}, "
             f"transformers {m['transformers']}, optimum-onnx {m['optimum']}, numpy {m['numpy']}.  ",
             f"Measured matmul peak: fp32 {max(peak['fp32'], peak.get('numpy_fp32', 0)) / 1e9:.0f} GFLOP/s, "
             f"int8 (u8s8) {peak['int8'] / 1e9:.0f} GOP/s" + (
                 f"; on OpenVINO's kernels: its default float precision {peak['openvino_default'] / 1e9:.0f} "
                 f"GFLOP/s, int8 {peak['openvino_int8'] / 1e9:.0f} GOP/s" if "openvino_default" in peak else "")
             + ".  ",
             *_peer_lines(report), *_sdcpp_lines(report),
             f"Started {report['started']}, finished {report.get('finished', '(unfinished)')}.  ",
             f"Command: `{report['command']}`", ""]
    for extra in report.get("appended", []):
        lines[-1:-1] = [f"Runs appended {extra['started']} to {extra.get('finished', '(unfinished)')} by "
                        f"`{extra['command']}`.  "]
    for size, systems in s.items():
        flops = report["unet_flops"].get(f"{size}x2", {}).get("total", 0)
        lines += [f"## {size}x{size} (U-Net batch 2: {flops / 1e9:.1f} GFLOP)", "",
                  "Milliseconds, median of the timed runs (min-max for the step). "
                  "Bound = fastest possible U-Net batch-2 call (a guided step) at the measured peaks (fp32 "
                  "systems: everything fp32; int8: matmuls int8, convolutions fp32; qdq: all int8 but the "
                  "convolutions it keeps float; on OpenVINO's kernels, float parts at its default precision's peak "
                  "(bf16 here), int8 at the better int8 peak: NNCF's hybrid int8 convolutions only, our openvino "
                  "scheme all but the layers it keeps float and the attention's products); "
                  "efficiency = bound / measured U-Net b2 call, and bound / median step (full steps only with the "
                  "step cache).", "",
                  "| system | runs | " + " | ".join(LABELS[f] for f in FIGURES) +
                  " | step (min-max) | U-Net b2 bound | efficiency b2 / step | load s | peak RSS MB |",
                  "|---" * (len(FIGURES) + 7) + "|"]
        for system in report["systems"]:
            c = systems.get(system)
            if not c:
                continue
            figs = " | ".join(_ms(c[f]["median"]) if c[f] else "-" for f in FIGURES)
            st = c["step"]
            step = f"{_ms(st['median'])} ({_ms(st['min'])}-{_ms(st['max'])})" if st else "-"
            eff = c.get("unet_b2_efficiency")
            lines.append(f"| {system} | {c['runs']} | {figs} | {step} | {_ms(c.get('unet_b2_bound_s', 0))} | "
                         f"{eff * 100:.0f}% / {c.get('step_efficiency', 0) * 100:.0f}% | {c['load_s']:.1f} | "
                         f"{c['peak_rss_mb']:.0f} |" if eff else
                         f"| {system} | {c['runs']} | {figs} | {step} | - | - | {c['load_s']:.1f} | "
                         f"{c['peak_rss_mb']:.0f} |")
        lines.append("")
        for base in ("optimum-fp32", "optimum-fp32-tiny"):  # the second: the same pipeline with the tiny VAE
            lines += against(report, size, systems, base)
    lines += preparation(report)
    failed = [r for r in report["runs"] if "error" in r]
    if failed:
        lines += [f"{len(failed)} worker run(s) failed: " +
                  ", ".join(f"{r['system']} {r['size']} round {r['round'] + 1}" for r in failed), ""]
    return "\n".join(lines)


def _peer_lines(report: dict) -> list[str]:
    """The OpenVINO peers' own package versions and inference precision (they run in their own venv)."""
    runs = [r for r in report["runs"] if r.get("versions") and r["system"].startswith("openvino")]
    if not runs:
        return []
    versions = ", ".join(f"{k} {v}" for k, v in runs[-1]["versions"].items())
    how: dict[str, set] = {}
    for r in runs:
        shapes = "static" if r.get("static_shapes", True) else "dynamic"
        how.setdefault(r["system"], set()).add(f"{r.get('inference_precision')} {shapes}")
    per_system = "; ".join(f"{k} {', '.join(sorted(v))}" for k, v in how.items())
    return [f"OpenVINO peers (own venv): {versions}. Inference precision and shapes: {per_system}.  "]


def _sdcpp_lines(report: dict) -> list[str]:
    """How the stable-diffusion.cpp rows were measured: only its whole generation can be timed from outside."""
    runs = [r for r in report["runs"] if r["system"].startswith("sdcpp") and r.get("versions")]
    if not runs:
        return []
    r = runs[-1]
    versions = ", ".join(f"{k} {v}" for k, v in r["versions"].items())
    return [f"stable-diffusion.cpp peers (own venv): {versions}; {r['threads']} threads, sampler {r['sampler']} (one "
            f"guided U-Net evaluation per step). Its text encoder (both prompts) and VAE decode figures are sd.cpp's "
            f"own timers inside the timed generation (its log, 10 ms resolution); its step is the interval between "
            f"its progress callbacks; its U-Net and VAE encoder cannot be called alone.  "]


def preparation(report: dict) -> list[str]:
    """What each folder cost to make (wall time and peak RSS of its export process) and its size on disk."""
    made, sizes = report.get("prepare", {}), report.get("folder_mib", {})
    if not made:
        return []
    lines = ["## Preparation", "", "Each folder's export in its own process (made once per weights; a folder made from "
             "another, e.g. openvino-int8 quantized from openvino-fp32, names it: its time comes on top of that "
             "one's).", "",
             "| folder | export s | export peak RSS MB | size MiB |", "|---|---|---|---|"]
    for name in dict.fromkeys([*sizes, *made]):  # a recorded intermediate (the LDM file) has no folder size
        mib, m = sizes.get(name), made.get(name, {})
        after = f" (+ {m['after']})" if m.get("after") else ""
        seconds = f"{m['seconds']:.0f}{after}" if m else "-"
        rss = f"{m['peak_rss_mb']:.0f}" if m else "-"
        lines.append(f"| {name} | {seconds} | {rss} | {'-' if mib is None else f'{mib:.0f}'} |")
    return lines + [""]


def against(report: dict, size: str, systems: dict, base: str = "optimum-fp32") -> list[str]:
    """Each system's figures as a fraction of the baseline's (medians over runs), for the performance targets."""
    b = systems.get(base)
    if not b or len(systems) < 2:
        return []
    steps = report["settings"]["steps"]
    lines = [f"Against {base} (fraction of its time; below 1 is faster). Mean step = a whole {steps}-step "
             "generation's step intervals averaged (prompt encoding in the first), median over runs; full / cached "
             "step = step-cache steps that run the whole U-Net / only its shallow part.", "",
             f"| system | U-Net b2 | U-Net b1 | median step | mean step | full step | cached step | txt2img ({steps} "
             "steps) | VAE dec | peak RSS MB |", "|---" * 10 + "|"]

    def ratio(c: dict, key: str, base_key: str | None = None) -> str:
        mine, theirs = c.get(key), b.get(base_key or key)
        if not mine or not theirs:
            return "-"
        return f"{mine['median'] / theirs['median']:.2f}"

    for system in report["systems"]:
        c = systems.get(system)
        if not c:
            continue
        name = system + (f" (interval {c['cache_interval']})" if c.get("cache_interval") else "")
        lines.append(f"| {name} | {ratio(c, 'unet_b2')} | {ratio(c, 'unet_b1')} | {ratio(c, 'step')} | "
                     f"{ratio(c, 'step_mean')} | "
                     f"{ratio(c, 'step_full', 'step')} | {ratio(c, 'step_cached', 'step')} | {ratio(c, 'txt2img')} | "
                     f"{ratio(c, 'vae_decode')} | {c['peak_rss_mb']:.0f} |")
    return lines + [""]


def chart(report: dict, path: Path) -> Path | None:
    """Per-step latency by system and size, with the fp32 and int8 bounds of a guided step drawn."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["summary"]
    sizes = list(s)
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.2), squeeze=False)
    colors = {"sdonnx-fp32": "#1f77b4", "sdonnx-int8": "#17becf", "optimum-fp32": "#ff7f0e", "diffusers-fp32": "#d62728",
              "sdonnx-int8-cache": "#2ca02c", "sdonnx-int8-lowmem": "#98df8a", "sdonnx-int8-qdq": "#9467bd",
              "openvino-fp32": "#8c564b", "openvino-fp32-f32": "#c49c94", "openvino-int8": "#e377c2",
              "openvino-int8-f32": "#f7b6d2", "openvino-fp32-tiny": "#bcbd22", "openvino-int8-tiny": "#dbdb8d"}
    for ax, size in zip(axes[0], sizes):
        # with a step cache the steps differ, so every system is drawn by its mean step
        key = "step_mean" if any(c.get("cache_interval") for c in s[size].values()) else "step"
        names = [n for n in report["systems"] if n in s[size] and s[size][n][key]]
        med = [s[size][n][key]["median"] for n in names]
        lo = [m - s[size][n][key]["min"] for m, n in zip(med, names)]
        hi = [s[size][n][key]["max"] - m for m, n in zip(med, names)]
        ax.bar(names, med, yerr=[lo, hi], capsize=4, color=[colors.get(n, "grey") for n in names])
        b = bounds(report, int(size), 2)
        for bound, style, label in (("fp32", "--", "fp32 bound"), ("int8_matmul_fp32_conv", ":", "int8 bound")):
            if bound in b:
                ax.axhline(b[bound], color="black", linestyle=style, linewidth=1, label=f"{label} {b[bound]:.2f} s")
        ax.set_title(f"{size}x{size}: one guided denoising step")
        ax.set_ylabel("seconds per step (median, min-max)" if key == "step" else
                      f"s per step (mean of {report['settings']['steps']}; median, min-max of runs)")
        ax.tick_params(axis="x", labelrotation=20)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['weights']} weights on {report['machine'].get('cpu')}, "
                 f"{report['machine'].get('physical_cores')} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(report: dict, folder: Path) -> tuple[Path, Path | None]:
    md = folder / f"{report['name']}.md"
    md.write_text(markdown(report))
    return md, chart(report, folder / f"{report['name']}.png")
