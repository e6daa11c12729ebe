"""sdonnx on ONNX Runtime's CUDA execution provider against diffusers on PyTorch: same GPU, same weights, one run.

    python benchmarks/gpu.py --weights sd15 --sizes 512 --runs 3 --steps 20

Systems: sdonnx-fp16 (our `--precision fp16` export on the CUDA provider), sdonnx-fp32 (our fp32 export on it),
diffusers-fp16 / diffusers-fp32 (StableDiffusionPipeline on the GPU, torch_dtype float16 / float32). As in
run.py, every timed run is a fresh worker process (worker.py --provider cuda) and the systems take turns in a
rotating order; each figure is timed after `--warmup` untimed calls, with the GPU synchronised before a clock
stops (our runtime's calls return host arrays, so they are synchronous). GPU memory is what the process added
to the device's used memory (NVML), which ORT's arena and PyTorch's caching allocator keep at their peak.
Writes results/<name>.json (every run) and results/<name>.md (medians, ratios against diffusers-fp16).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import summarize  # noqa: E402
from run import log, python, run_worker  # noqa: E402
from worker import FIGURES  # noqa: E402

# system -> model folder (prepare.py's names)
SYSTEMS = {"sdonnx-fp16": "sdonnx-fp16", "sdonnx-fp32": "sdonnx-fp32",
           "diffusers-fp16": "weights", "diffusers-fp32": "weights"}
BASE = "diffusers-fp16"


def machine() -> dict:
    """The GPU (nvidia-smi), the CPU and the library versions that made the numbers."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    info = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        info["gpu"] = out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = None
    for lib in ("onnxruntime-gpu", "onnxruntime", "torch", "diffusers", "transformers", "numpy"):
        try:
            info[lib] = version(lib)
        except PackageNotFoundError:
            info[lib] = None
    try:
        import onnxruntime as ort

        info["ort_providers"] = ort.get_available_providers()
    except ImportError:
        info["ort_providers"] = []
    return info


def _median(cell: dict, figure: str) -> float | None:
    return cell.get(figure, {}).get("median")


def markdown(report: dict) -> str:
    m = report["machine"]
    gpu_build = m.get("onnxruntime-gpu")
    ort = f"onnxruntime-gpu {gpu_build}" if gpu_build else f"onnxruntime {m.get('onnxruntime')}"
    lines = [f"# GPU benchmark `{report['name']}`: {report['weights']} weights, {report['steps']}-step txt2img", "",
             f"GPU: {m.get('gpu')}; {m.get('platform')}.  ",
             f"{ort} (providers: "
             f"{', '.join(m.get('ort_providers', []))}), torch {m.get('torch')}, diffusers {m.get('diffusers')}, "
             f"transformers {m.get('transformers')}, numpy {m.get('numpy')}.  ",
             f"Started {report['started']}, finished {report.get('finished', '(unfinished)')}.  ",
             f"Command: `{report['command']}`", ""]
    for size, systems in report["summary"].items():
        lines += [f"## {size}x{size}", "",
                  f"Milliseconds, medians of the timed runs ({report['warmup']} warm-up calls each); step = one "
                  "guided denoising step inside the whole generation (batch 2: uncond + cond).", "",
                  "| system | runs | " + " | ".join(FIGURES) + " | step | load s | GPU MiB |",
                  "|---" * (len(FIGURES) + 5) + "|"]
        for system in report["systems"]:
            c = systems.get(system)
            if c:
                figs = " | ".join(f"{_median(c, f) * 1000:.1f}" if _median(c, f) else "-" for f in FIGURES + ("step",))
                mem = f"{c['gpu_mem_mb']:.0f}" if c.get("gpu_mem_mb") is not None else "-"
                lines.append(f"| {system} | {c['runs']} | {figs} | {c['load_s']:.1f} | {mem} |")
        base = systems.get(BASE)
        if base:
            lines += ["", f"Against {BASE} (fraction of its time; below 1 is faster):", "",
                      "| system | " + " | ".join(FIGURES + ("step",)) + " |", "|---" * (len(FIGURES) + 2) + "|"]
            for system in report["systems"]:
                c = systems.get(system)
                if c:
                    cells = [f"{_median(c, f) / _median(base, f):.2f}" if _median(c, f) and _median(base, f) else "-"
                             for f in FIGURES + ("step",)]
                    lines.append(f"| {system} | " + " | ".join(cells) + " |")
        lines.append("")
    failed = [r for r in report["runs"] if "error" in r]
    if failed:
        lines += [f"{len(failed)} worker run(s) failed: " + "; ".join(
            f"{r['system']} {r['size']}: {r['error'].strip().splitlines()[-1]}" for r in failed), ""]
    return "\n".join(lines)


def save(report: dict, folder: Path) -> Path:
    report["summary"] = summarize(report)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{report['name']}.json").write_text(json.dumps(report, indent=1) + "\n")
    md = folder / f"{report['name']}.md"
    md.write_text(markdown(report))
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", choices=["sd15", "bundled", "tiny"], default="sd15")
    ap.add_argument("--sizes", default="512", help="square image sizes in pixels, comma-separated")
    ap.add_argument("--runs", type=int, default=3, help="timed runs (fresh worker each) per system and size")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps of the whole txt2img")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls of each figure before the timed one")
    ap.add_argument("--systems", default="sdonnx-fp16,diffusers-fp16",
                    help="comma-separated, of: " + ", ".join(SYSTEMS))
    ap.add_argument("--figures", default=",".join(FIGURES))
    ap.add_argument("--work", default=None, help="model folders (default: models/bench/WEIGHTS)")
    ap.add_argument("--name", default=None, help="results/<name>.{json,md} (default: <weights>-gpu)")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder of the results")
    a = ap.parse_args()
    systems = [s for s in a.systems.split(",") if s]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        ap.error(f"unknown systems: {', '.join(unknown)} (known: {', '.join(SYSTEMS)})")
    work = Path(a.work or HERE.parent / "models" / "bench" / a.weights)
    needed = sorted({"weights"} | {SYSTEMS[s] for s in systems})
    log(f"preparing model folders in {work}: {', '.join(needed)}")
    folders = json.loads(python([str(HERE / "prepare.py"), str(work), a.weights, *needed]))
    report = {"name": a.name or f"{a.weights}-gpu", "weights": a.weights, "steps": a.steps, "warmup": a.warmup,
              "command": " ".join(["python", *sys.argv]), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "systems": systems, "machine": machine(), "runs": []}
    out = Path(a.out)
    for size in (int(s) for s in a.sizes.split(",")):
        for r in range(a.runs):
            for system in [systems[(r + k) % len(systems)] for k in range(len(systems))]:
                log(f"{size}x{size} round {r + 1}/{a.runs}: {system}")
                try:
                    res = run_worker(system, folders[SYSTEMS[system]], size, a.steps, a.warmup, a.figures,
                                     ["--provider", "cuda"])
                except (RuntimeError, subprocess.SubprocessError) as err:
                    log(f"  failed: {err}")
                    res = {"system": system, "size": size, "error": str(err)[-2000:]}
                res["round"] = r
                report["runs"].append(res)
                save(report, out)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    log(f"wrote {save(report, out)}")


if __name__ == "__main__":
    main()
