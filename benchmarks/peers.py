"""Peer systems that live in their own virtual environment (their pins clash with the dev extra's).

    python benchmarks/peers.py setup openvino [--force]     # -> models/peers/openvino (git-ignored)
    python benchmarks/peers.py setup sdcpp                  # stable-diffusion.cpp, built from source (~5+ min)
    python benchmarks/peers.py python openvino              # prints that venv's interpreter

run.py and prepare.py start a peer's worker and exports with the interpreter of its venv; every other system
runs on the interpreter running them. The venvs do not see the system's site packages: OpenVINO's optimum-intel
needs transformers 5 and diffusers 0.39 where the dev extra pins 4.57 and 0.35. sdonnx itself goes into each
venv editable and without its dependencies, so the worker can import sdonnx.figures (numpy only) but nothing
that needs onnxruntime.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENVS = ROOT / "models" / "peers"
# venv -> (system-name prefix, the packages installed before its requirements file, that file, then removed,
#          environment variables of its installs)
PEERS = {
    # torch first, so that the CPU build (the machine's wheel) is the one the rest resolves against; the
    # torchvision optimum-intel pulls is a CUDA build that breaks imports next to it, and SD never uses it
    "openvino": ("openvino-", ["torch==2.13.0"], HERE / "requirements-openvino.txt", ["torchvision"], {}),
    # the binding compiles sd.cpp; GGML_NATIVE builds ggml for this CPU (AVX-512 here), as a local build would
    "sdcpp": ("sdcpp-", [], HERE / "requirements-sdcpp.txt", [], {"CMAKE_ARGS": "-DGGML_NATIVE=ON"}),
}


def venv_of(system: str) -> str | None:
    """The peer venv a system runs in, or None for the interpreter running the harness."""
    return next((name for name, (prefix, *_) in PEERS.items() if system.startswith(prefix)), None)


def python_of(venv: str) -> Path:
    """That venv's interpreter (which may not exist yet)."""
    return VENVS / venv / "bin" / "python"


def interpreter(system: str) -> str:
    """The Python that runs `system`'s worker and exports; a one-line exit if its venv is missing."""
    venv = venv_of(system)
    if venv is None:
        return sys.executable
    path = python_of(venv)
    if not path.is_file():
        raise SystemExit(f"{system} needs its own venv, which is missing: run `python benchmarks/peers.py setup {venv}`")
    return str(path)


def setup(venv: str, force: bool = False) -> Path:
    """Create the venv and install its pins; built beside its final place and moved there only when complete."""
    _, first, requirements, remove, env = PEERS[venv]
    final = VENVS / venv
    if final.exists() and not force:
        print(f"{final} exists (--force to rebuild it)", file=sys.stderr)
        return python_of(venv)
    # a venv records its own path in its scripts, so it is built where it will live; a failure removes it whole
    shutil.rmtree(final, ignore_errors=True)
    start = time.perf_counter()
    pip = [str(final / "bin" / "python"), "-m", "pip", "install", "-q"]
    try:
        subprocess.run([sys.executable, "-m", "venv", str(final)], check=True)
        if first:
            subprocess.run([*pip, *first], check=True)
        subprocess.run([*pip, "-r", str(requirements)], check=True, env={**os.environ, **env})
        if remove:
            subprocess.run([str(final / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", *remove], check=True)
        subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True)
    except (subprocess.CalledProcessError, KeyboardInterrupt):
        shutil.rmtree(final, ignore_errors=True)
        raise SystemExit(f"setting up {final} failed (removed); see pip's output above")
    print(f"{final} ready in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return python_of(venv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["setup", "python"])
    ap.add_argument("venv", choices=sorted(PEERS))
    ap.add_argument("--force", action="store_true", help="setup: rebuild the venv even if it exists")
    a = ap.parse_args()
    print(setup(a.venv, a.force) if a.action == "setup" else python_of(a.venv))


if __name__ == "__main__":
    main()
