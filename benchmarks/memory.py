"""Peak memory of a 512x512 generation: the streamed low-memory mode against the whole-graph one and the fast one.

Each configuration runs in its own child process, one after another (never two at once: they would share the
cores and the page cache), which reports its own getrusage peak, its step times and where the peak grew (the
peak read after text encoding, after each step and after decoding). Then the exact CLI command runs under
`/usr/bin/time -v` inside a memory cgroup with a hard limit (cgroup v1 `memory.limit_in_bytes`, a child of this
process's own cgroup; or cgroup v2 `memory.max`), which must complete without being killed; and, as the control
that shows the limit bites, the whole-graph low-memory generation under the same limit.

A cgroup charges the memory its processes allocate, and file pages they read first; the Python modules and
model files already in the page cache stay charged where they were, so its usage reads lower than the RSS.

    python benchmarks/memory.py --model models/sd15-int8-stream --out benchmarks/results/memory-stream-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "a cat"
CONFIGS = {  # name -> Pipeline.load options
    "streamed": {"low_memory": True},
    "whole-graphs": {"low_memory": True, "stream": False},  # low-memory mode, the U-Net and decoder unstreamed
    "fast": {},
}


def child(config: str, model: str, size: int, steps: int, out: Path) -> dict:
    """One generation in this process; the image goes to `out` (.npy)."""
    import resource

    from sdonnx.pipeline import Pipeline

    def peak() -> float:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    phases: dict[str, float] = {"start": peak()}
    start = time.perf_counter()
    pipe = Pipeline.load(model, **CONFIGS[config])
    phases["loaded"] = peak()
    load_s = time.perf_counter() - start
    encode = pipe._encode_texts

    def encode_texts(*args, **kwargs):
        out = encode(*args, **kwargs)
        phases["text encoder"] = peak()
        return out

    pipe._encode_texts = encode_texts
    ticks: list[float] = []
    cpu: list[float] = []  # process CPU seconds: less sensitive than wall time to other processes on the machine

    def step(k: int, total: int, latents) -> None:
        ticks.append(time.perf_counter())
        cpu.append(time.process_time())
        phases[f"step {k + 1}"] = peak()

    begin = time.perf_counter()
    image = pipe.txt2img(PROMPT, steps=steps, width=size, height=size, seed=0, callback=step, output_type="np")
    end = time.perf_counter()
    phases["vae decoder"] = peak()
    np.save(out, image)
    # the steps after the first: the first also pays for first-run allocations in the fast configuration
    step_s = [b - a for a, b in zip(ticks, ticks[1:])]
    step_cpu_s = [b - a for a, b in zip(cpu, cpu[1:])]
    return {"peak_rss_mb": peak(), "peak_after": phases, "load_s": round(load_s, 2),
            "txt2img_s": round(end - begin, 2), "step_s": round(float(np.median(step_s)), 2) if step_s else None,
            "step_cpu_s": round(float(np.median(step_cpu_s)), 2) if step_cpu_s else None,
            "decode_s": round(end - ticks[-1], 2)}


def run_child(config: str, args, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", config, "--model", args.model, "--size", str(args.size),
           "--steps", str(args.steps), "--image", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{config}: child failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the CLI under a hard memory limit -----------------------------------------------------------------------


def make_cgroup(limit_mb: int) -> tuple[Path, str]:
    """A fresh memory cgroup below this process's own, limited to `limit_mb` MiB; (its folder, its kind)."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    v1 = next((line.split(":", 2)[2] for line in lines if line.split(":")[1] == "memory"), None)
    limit = str(limit_mb * 2**20)
    if v1 is not None and Path("/sys/fs/cgroup/memory").is_dir():
        group = Path("/sys/fs/cgroup/memory" + v1) / f"sdonnx-memory-{os.getpid()}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(limit)
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.exists():  # memory plus swap: no escaping the limit into swap
            swap.write_text(limit)
        return group, "cgroup v1 memory.limit_in_bytes (+ memsw)"
    v2 = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
    group = Path("/sys/fs/cgroup" + v2) / f"sdonnx-memory-{os.getpid()}"
    group.mkdir()
    (group / "memory.max").write_text(limit)
    (group / "memory.swap.max").write_text("0")
    return group, "cgroup v2 memory.max (swap 0)"


def cgroup_report(group: Path) -> dict:
    read = lambda name: (group / name).read_text().strip() if (group / name).exists() else None  # noqa: E731
    out = {"max_usage_mb": None, "failcnt": read("memory.failcnt")}
    usage = read("memory.max_usage_in_bytes") or read("memory.peak")
    if usage:
        out["max_usage_mb"] = round(int(usage) / 2**20, 1)
    oom = read("memory.oom_control") or read("memory.events")
    if oom:
        out["oom"] = dict(line.split() for line in oom.splitlines())
    return out


def under_limit(cmd: list[str], limit_mb: int) -> dict:
    """Run `cmd` under /usr/bin/time -v inside a fresh cgroup of `limit_mb` MiB; how it ended and its peaks."""
    group, kind = make_cgroup(limit_mb)
    try:
        enter = f"echo $$ > {group}/cgroup.procs && exec \"$@\""
        start = time.perf_counter()
        done = subprocess.run(["sh", "-c", enter, "sh", "/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
        wall = time.perf_counter() - start
        report = cgroup_report(group)
    finally:
        group.rmdir()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    status = re.search(r"Exit status: (\d+)", done.stderr)
    signal = re.search(r"Command terminated by signal (\d+)", done.stderr)
    return {"limit": f"{kind} = {limit_mb} MiB", "completed": done.returncode == 0,
            "exit_status": int(status[1]) if status else None, "killed_by_signal": int(signal[1]) if signal else None,
            "wall_s": round(wall, 1), "time_v_max_rss_mb": round(int(rss[1]) / 1024, 1) if rss else None,
            "cgroup": report}


def cli_command(args, png: Path) -> list[str]:
    """The exact `sdonnx generate` command the limit is proved with."""
    sdonnx = shutil.which("sdonnx") or str(Path(sys.executable).with_name("sdonnx"))
    return [sdonnx, "generate", PROMPT, "--model", args.model, "--low-memory", "--width", str(args.size),
            "--height", str(args.size), "--steps", str(args.steps), "--seed", "0", "-o", str(png)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a folder exported with --stream")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--limit-mb", type=int, default=700, help="the cgroup's memory limit for the CLI run")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="which child runs, comma-separated")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/memory-stream-cpu.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.size, args.steps, args.image)))
        return
    from sdonnx.system import machine

    work = Path(tempfile.mkdtemp(prefix="sdonnx-memory-"))
    try:
        runs = {}
        for config in args.configs.split(","):
            runs[config] = run_child(config, args, work / f"{len(runs)}.npy")
            print(config, json.dumps(runs[config]), flush=True)
        images = {c: np.load(work / f"{i}.npy") for i, c in enumerate(runs)}
        result = {"what": f"peak memory of a {args.size}x{args.size} txt2img, {args.steps} steps, guided (7.5), "
                          "each configuration in a fresh child process, run one after another",
                  "model": args.model, "machine": machine(), "configs": runs}
        if "streamed" in images:
            result["max_abs_diff_vs_streamed"] = {c: float(np.abs(img - images["streamed"]).max())
                                                 for c, img in images.items() if c != "streamed"}
        cmd = cli_command(args, work / "limited.png")
        # the control: the same generation with the whole graphs, which the limit should stop
        control = [sys.executable, __file__, "--child", "whole-graphs", "--model", args.model, "--size",
                   str(args.size), "--steps", str(args.steps), "--image", str(work / "control.npy")]
        for key, command, shown in (("cli_under_limit", cmd, "sdonnx"), ("control_whole_graphs_under_limit",
                                                                         control, "python")):
            try:
                result[key] = {"command": " ".join([shown, *command[1:]]), **under_limit(command, args.limit_mb)}
            except OSError as err:  # no writable cgroup here: say so in the result rather than lose the rest
                result[key] = {"error": f"no memory cgroup could be made: {err}"}
            print(key, json.dumps(result[key]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["command"] = "python " + " ".join(sys.argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
