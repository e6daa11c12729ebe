"""An LDM single-file checkpoint -> stable-diffusion.cpp's GGUF at one weight type, with sd.cpp's own convert.

    models/peers/sdcpp/bin/python benchmarks/sdcpp_convert.py MODEL.safetensors OUT_FOLDER q8_0|f16

Run by prepare.py with the sdcpp venv's interpreter (peers.py). Writes OUT_FOLDER/model.gguf through a temporary
folder, so an interrupted conversion leaves nothing behind. sd.cpp decides per tensor what it converts: with q8_0
the matrices whose rows are a multiple of its block size are quantized, the biases and norms keep their type.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

GGUF = "model.gguf"  # the file the sdcpp worker loads from a folder
TYPES = ("q8_0", "f16")


def convert(checkpoint: Path, out: Path, weight_type: str) -> Path:
    import stable_diffusion_cpp as sd_cpp
    from stable_diffusion_cpp.stable_diffusion import GGML_TYPE_MAP

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # the C function directly: the binding's StableDiffusion.convert needs a loaded model first
    ok = sd_cpp.convert(str(checkpoint).encode(), b"", str(tmp / GGUF).encode(), GGML_TYPE_MAP[weight_type], b"", True)
    if not ok or not (tmp / GGUF).is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"stable-diffusion.cpp could not convert {checkpoint} to {weight_type} (see its log above)")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out / GGUF


def main() -> None:
    if len(sys.argv) != 4 or sys.argv[3] not in TYPES:
        raise SystemExit(f"usage: sdcpp_convert.py MODEL.safetensors OUT_FOLDER {{{','.join(TYPES)}}}")
    checkpoint = Path(sys.argv[1])
    if not checkpoint.is_file():
        raise SystemExit(f"{checkpoint}: no such file")
    print(convert(checkpoint, Path(sys.argv[2]), sys.argv[3]))


if __name__ == "__main__":
    main()
