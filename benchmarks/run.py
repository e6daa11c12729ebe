"""Compare sdonnx (fp32, int8), optimum's ORT pipeline, diffusers, OpenVINO and stable-diffusion.cpp on the same weights; write JSON, table, chart.

    python benchmarks/run.py --weights sd15 --sizes 256,512 --runs 5 --steps 3

Each timed run is a fresh worker process per system (load, warm up, time every figure once, exit), and the
systems take turns in a rotating order, so drift on this shared machine hits all of them alike and only one
system's memory is resident at a time. Results are saved after every worker, so an interrupted run keeps
what it measured; `--report-only` redraws the table and chart from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import peers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SYSTEMS = ("sdonnx-fp32", "sdonnx-int8", "optimum-fp32", "diffusers-fp32")
# system -> (model folder, extra worker options); `{k}` is --cache-interval
KNOWN = {
    "sdonnx-fp32": ("sdonnx-fp32", []),
    "sdonnx-int8": ("sdonnx-int8", []),
    "optimum-fp32": ("optimum-fp32", []),
    "diffusers-fp32": ("weights", []),
    # int8 + MultiHeadAttention + DeepCache graphs, run with the step cache
    "sdonnx-int8-cache": ("sdonnx-int8-cache", ["--cache-interval", "{k}"]),
    # the compact int8 export (conv weights int8 too) with the step cache, in low-memory mode (sessions opened
    # per use, no arena, tiled VAE decode, freed buffers returned to the system)
    "sdonnx-int8-lowmem": ("sdonnx-int8-compact", ["--cache-interval", "{k}", "--low-memory"]),
    # static QDQ int8 convolutions (residual-stream ones float) + MultiHeadAttention, with the step cache
    "sdonnx-int8-qdq": ("sdonnx-int8-qdq", ["--cache-interval", "{k}"]),
    # the same folders decoding (and encoding) with the tiny VAE exported beside the full one (--weights sd-turbo)
    "sdonnx-fp32-tiny": ("sdonnx-fp32", ["--vae", "tiny"]),
    "sdonnx-int8-tiny": ("sdonnx-int8", ["--vae", "tiny"]),
    "sdonnx-int8-qdq-tiny": ("sdonnx-int8-qdq", ["--cache-interval", "{k}", "--vae", "tiny"]),
    # the peers with the same tiny VAE: optimum's folder with its graphs as the VAE, diffusers with AutoencoderTiny
    "optimum-fp32-tiny": ("optimum-fp32-tiny", []),
    "diffusers-fp32-tiny": ("weights", ["--vae", "tiny"]),
    # OpenVINO (optimum-intel's pipeline, static shapes), in its own venv (peers.py): the fp32 IR and NNCF's hybrid
    # int8, each at OpenVINO's default inference precision (bf16 on a CPU with AVX512-BF16/AMX) and at f32
    "openvino-fp32": ("openvino-fp32", []),
    "openvino-fp32-f32": ("openvino-fp32", ["--inference-precision", "f32"]),
    "openvino-int8": ("openvino-int8", []),
    "openvino-int8-f32": ("openvino-int8", ["--inference-precision", "f32"]),
    # IRs exported at fp16 weights and with int8 weight compression (int8 weights, default bf16 compute): SDXL's
    "openvino-fp16": ("openvino-fp16", []),
    "openvino-int8w": ("openvino-int8w", []),
    "openvino-int8w-tiny": ("openvino-int8w-tiny", []),
    # the same IRs with their dynamic shapes kept (optimum-intel's default; FastSD reshapes), to see what static buys
    "openvino-fp32-dynamic": ("openvino-fp32", ["--dynamic"]),
    "openvino-int8-dynamic": ("openvino-int8", ["--dynamic"]),
    # the same pipeline with the tiny VAE, as optimum-fp32-tiny: the two IRs with our export's tiny graphs
    # converted to IR as their VAE (default precision; the tiny VAE's weights fp32 in both)
    "openvino-fp32-tiny": ("openvino-fp32-tiny", []),
    "openvino-int8-tiny": ("openvino-int8-tiny", []),
    # our runtime and folders on OpenVINO's kernels (--provider openvino, its default precision: bf16 here)
    "sdonnx-fp32-ov": ("sdonnx-fp32", ["--provider", "openvino"]),
    "sdonnx-fp32-ov-tiny": ("sdonnx-fp32", ["--provider", "openvino", "--vae", "tiny"]),
    # the int8 form OpenVINO runs as int8 (--int8-scheme openvino: static QDQ convolutions and linear layers)
    "sdonnx-int8-ov": ("sdonnx-int8-ov", ["--provider", "openvino", "--cache-interval", "{k}"]),
    "sdonnx-int8-ov-tiny": ("sdonnx-int8-ov", ["--provider", "openvino", "--cache-interval", "{k}", "--vae", "tiny"]),
    # ... with its VAE decoder static int8 too (--int8-vae): on OpenVINO's kernels, and the same folder on ONNX
    # Runtime alone (for its VAE decode: there the qdq scheme's U-Net, not this one, is our faster)
    "sdonnx-int8-ov-vae8": ("sdonnx-int8-ov-vae8", ["--provider", "openvino", "--cache-interval", "{k}"]),
    "sdonnx-int8-vae8-ort": ("sdonnx-int8-ov-vae8", ["--cache-interval", "{k}"]),
    # stable-diffusion.cpp (its Python binding, own venv) on sd.cpp's GGUF conversion of the same weights: q8_0
    # (linear and attention matrices quantized) and f16; whole generations only (sdcpp_system.py)
    "sdcpp-q8_0": ("sdcpp-q8_0", []),
    "sdcpp-f16": ("sdcpp-f16", []),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def python(args: list[str], timeout: float | None = None, interpreter: str = sys.executable) -> str:
    """Run a helper script; its stdout, or exit with its stderr tail."""
    done = subprocess.run([interpreter, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if done.returncode:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(args[:3])} failed ({done.returncode}):\n{tail}")
    return done.stdout


def run_worker(system: str, folder: Path | str, size: int, steps: int, warmup: int, figures: str,
               extra: list[str] = ()) -> dict:
    """One fresh worker.py process timing `system` on `folder` (with the Python of the system's venv, see
    peers.py); the result it prints on its RESULT line."""
    out = python(worker_command(system, folder, size, steps, warmup, figures, extra), interpreter=peers.interpreter(system))
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"worker.py {system} printed no RESULT line")
    return json.loads(line[len("RESULT "):])


def worker_command(system: str, folder: Path | str, size: int, steps: int, warmup: int, figures: str,
                   extra: list[str] = ()) -> list[str]:
    """worker.py's arguments (after the interpreter)."""
    return [str(HERE / "worker.py"), system, str(folder), "--size", str(size), "--steps", str(steps),
            "--warmup", str(warmup), "--figures", figures, *extra]


def worker(system: str, folder: Path, size: int, args: argparse.Namespace) -> dict:
    extra = [x.format(k=args.cache_interval) for x in KNOWN[system][1]] + ["--repeat", str(args.repeat)]
    if args.guidance is not None:
        extra += ["--guidance", str(args.guidance)]
    return run_worker(system, folder, size, args.steps, args.warmup, args.figures, extra)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run(args: argparse.Namespace) -> dict:
    work = Path(args.work or ROOT / "models" / "bench" / args.weights)
    out_json = HERE / "results" / f"{args.name}.json"
    needed = sorted({"weights"} | {KNOWN[s][0] for s in args.systems})
    log(f"preparing model folders in {work}: {', '.join(needed)}")
    folders = {k: Path(v) for k, v in
               json.loads(python([str(HERE / "prepare.py"), str(work), args.weights, *needed])).items()}
    sys.path.insert(0, str(HERE))
    from prepare import folder_sizes, preparation

    command = " ".join(["python", *sys.argv])
    if args.append:  # more runs into an existing result (the machine facts and limit stay those measured then)
        report = json.loads(out_json.read_text())
        same = ("steps", "warmup", "weights")
        if any(report["settings"].get(k) != getattr(args, k) for k in same):
            theirs = ", ".join(f"{k}={report['settings'].get(k)}" for k in same)
            raise SystemExit(f"--append: {', '.join(same)} must equal those of {out_json.name} ({theirs})")
        report.setdefault("appended", []).append({"command": command,
                                                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
        report["systems"] += [s for s in args.systems if s not in report["systems"]]
        report["folder_mib"].update(folder_sizes(folders))
        report.setdefault("prepare", {}).update(preparation(work, needed))
    else:
        log("machine, matrix-multiply peak, U-Net FLOPs")
        limit = json.loads(python([str(HERE / "limit.py"), str(folders["weights"]), args.sizes]))
        report = {"name": args.name, "weights": args.weights, "command": command,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "settings": vars(args),
                  "systems": list(args.systems), "folder_mib": folder_sizes(folders),
                  "prepare": preparation(work, needed), **limit, "runs": []}
    for size in (int(s) for s in args.sizes.split(",")):
        done_rounds = 1 + max((r["round"] for r in report["runs"] if r["size"] == size), default=-1)
        for r in range(args.runs):
            order = [args.systems[(r + k) % len(args.systems)] for k in range(len(args.systems))]
            for system in order:
                if args.stop_at and time.strftime("%H:%M") >= args.stop_at and not _wraps(args.stop_at):
                    if "stopped_early" not in report:
                        log(f"{args.stop_at} reached: no more runs")
                    report["stopped_early"] = f"no worker started after {args.stop_at}"
                    continue
                log(f"{size}x{size} round {r + 1}/{args.runs}: {system}")
                try:
                    res = worker(system, folders[KNOWN[system][0]], size, args)
                except (RuntimeError, subprocess.SubprocessError) as err:
                    log(f"  failed: {err}")
                    res = {"system": system, "size": size, "error": str(err)[-2000:]}
                res.update(round=done_rounds + r, load_average=load_average(),
                           finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
                report["runs"].append(res)
                save(report, out_json)
    # the peak again at the end: other work on a shared machine can only make a measured peak lower
    again = json.loads(python([str(HERE / "limit.py"), "--peak-only"]))
    report["matmul_peak"] = {k: max(v, again[k]) for k, v in report["matmul_peak"].items()}
    if args.append:
        report["appended"][-1]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    else:
        report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    save(report, out_json)
    return report


def _wraps(stop_at: str) -> bool:
    """True while the clock has not yet passed midnight towards a stop time set just after it."""
    return time.strftime("%H:%M") > "12:00" and stop_at < "12:00"


def save(report: dict, path: Path) -> None:
    from report import summarize

    path.parent.mkdir(parents=True, exist_ok=True)
    report["summary"] = summarize(report)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", choices=["sd15", "sd15-lcm", "sd-turbo", "sdxl", "sdxl-turbo", "bundled", "tiny"],
                    default="sd15",
                    help="sd15: SD 1.5 architecture, random weights; sd15-lcm: its LCM-distilled layout (guidance an "
                         "input of the U-Net, LCM sampler; run it with --steps 4); sd-turbo: SD 2.1's architecture at "
                         "512 with a random tiny VAE (TAESD) beside its VAE (run it with --steps 1 --guidance 0 "
                         "--cache-interval 1); sdxl / sdxl-turbo: SDXL base's architecture, random weights, with SDXL's "
                         "or SDXL-Turbo's scheduler (turbo: --sizes 512 --steps 1 --guidance 0); bundled: the trained "
                         "tiny model that ships "
                         "with sdonnx (export/tiny/weights); tiny: tests/tiny_sd.py (harness check)")
    ap.add_argument("--sizes", default="256,512", help="square image sizes in pixels, comma-separated")
    ap.add_argument("--runs", type=int, default=5, help="timed runs (fresh worker each) per system and size")
    ap.add_argument("--steps", type=int, default=3, help="denoising steps of the whole txt2img")
    # two: ONNX Runtime's second U-Net call at 512x512 is still ~1.6x slower than its third (the committed
    # results so far were made with one; their settings record it)
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls of each figure before the timed one")
    ap.add_argument("--repeat", type=int, default=1,
                    help="timed calls of each figure per run (more for millisecond figures: one call is mostly noise)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, of: " + ", ".join(KNOWN))
    ap.add_argument("--figures", default="text_encoder,unet_b2,unet_b1,vae_decode,vae_encode,txt2img",
                    help="which figures each worker times (a subset saves time on long generations)")
    ap.add_argument("--cache-interval", type=int, default=3, help="step-cache interval of sdonnx-int8-cache/lowmem")
    ap.add_argument("--guidance", type=float, default=None,
                    help="guidance scale of every system's txt2img (default: the worker's, SD's 7.5)")
    ap.add_argument("--append", action="store_true",
                    help="add the runs to results/<name>.json instead of starting it afresh (rounds continue)")
    ap.add_argument("--work", default=None, help="model folders (default: models/bench/WEIGHTS, git-ignored)")
    ap.add_argument("--name", default=None, help="results/<name>.{json,md,png} (default: <weights>-cpu)")
    ap.add_argument("--stop-at", default=None, metavar="HH:MM",
                    help="start no worker after this local time (the runs so far are kept and reported)")
    ap.add_argument("--report-only", action="store_true", help="redraw table and chart from results/<name>.json")
    args = ap.parse_args()
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in args.systems if s not in KNOWN]
    if unknown:
        ap.error(f"unknown systems: {', '.join(unknown)} (known: {', '.join(KNOWN)})")
    if not args.report_only:
        for system in args.systems:  # a peer's venv missing: one line now, not a failed worker per run
            peers.interpreter(system)
    args.name = args.name or f"{args.weights}-cpu"
    sys.path.insert(0, str(HERE))
    from report import write_outputs

    path = HERE / "results" / f"{args.name}.json"
    if args.report_only:
        report = json.loads(path.read_text())
        save(report, path)
    else:
        report = run(args)
    md, png = write_outputs(report, HERE / "results")
    log(f"wrote {path}, {md}, {png}")


if __name__ == "__main__":
    main()
