"""Two installs of sdonnx timed by `sdonnx bench`, interleaved: is a change faster or slower than before it?

    python benchmarks/ab.py --a /path/to/old/venv/bin/python --b python --rounds 5 -- --steps 20
    python benchmarks/ab.py --a OLD --b NEW --rounds 3 -- --model models/sd15-fp32 --size 256x256 --steps 3 --runs 2

Each round runs `python -m sdonnx.cli bench --json ARGS` once per install, in a fresh process, alternating which
goes first, so drift on a shared machine hits both alike. Prints the medians of each figure, the ratio b / a,
and writes the raw reports with --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

FIGURES = ("load_s", "text_encoder", "unet_b2", "unet_b1", "vae_decode", "step_s", "txt2img_s")


def bench(python: str, args: list[str]) -> dict:
    """One `sdonnx bench --json` report from the install behind `python`."""
    try:
        done = subprocess.run([python, "-m", "sdonnx.cli", "bench", "--json", *args], capture_output=True, text=True)
    except OSError as err:
        raise SystemExit(f"cannot run {python}: {err.strerror}") from None
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"{python}: sdonnx bench failed: {last}")
    return json.loads(done.stdout)


def figure(report: dict, name: str) -> float | None:
    """A report's median seconds for one figure (load time is a single number)."""
    if name == "load_s":
        return report["load_s"]
    entry = report.get(name) or report["components_s"].get(name)
    return None if not entry else entry["median"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="python of the first install (e.g. before the change)")
    ap.add_argument("--b", default=sys.executable, help="python of the second install (default: this one)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, help="write both installs' reports here as JSON")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: arguments of sdonnx bench")
    a = ap.parse_args()
    args = [x for x in a.bench_args if x != "--"]
    reports: dict[str, list[dict]] = {"a": [], "b": []}
    for r in range(a.rounds):
        for side in ("ab" if r % 2 == 0 else "ba"):
            print(f"[{time.strftime('%H:%M:%S')}] round {r + 1}/{a.rounds}: {side}", file=sys.stderr, flush=True)
            reports[side].append(bench(getattr(a, side), args))
    print(f"{'figure':<14}{'a median s':>12}{'b median s':>12}{'b / a':>8}")
    for name in FIGURES:
        xs = {side: [v for v in (figure(rep, name) for rep in reports[side]) if v is not None] for side in "ab"}
        if xs["a"] and xs["b"]:
            ma, mb = statistics.median(xs["a"]), statistics.median(xs["b"])
            print(f"{name:<14}{ma:>12.4f}{mb:>12.4f}{mb / ma:>8.3f}")
    if a.out:
        a.out.write_text(json.dumps({"command": " ".join(sys.argv), "a": a.a, "b": a.b, "reports": reports},
                                    indent=1) + "\n")


if __name__ == "__main__":
    main()
