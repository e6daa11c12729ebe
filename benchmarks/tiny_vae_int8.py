"""The int8 VAE decoder (--int8-vae) on trained weights: the bundled tiny model's decoder, image PSNR against its
fp32 decoder on the final latents of our own generations (fresh captions, the folder's defaults).

    python benchmarks/prepare.py models/bench/bundled bundled sdonnx-int8-ov sdonnx-int8-ov-vae8
    python benchmarks/tiny_vae_int8.py models/bench/bundled [--n 16]

Both images clipped to [-1, 1], peak 2 (8-bit pictures' usual PSNR); the int8 decoder on ONNX Runtime and on
OpenVINO's kernels, and the fp32 one in OpenVINO's default bf16 for scale.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from int8_quality import decoder_inputs, image_psnr, run_onnxruntime, run_openvino


def final_latents(folder: Path, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    from sdonnx import Pipeline
    from sdonnx.export.tiny.shapes import random_scene

    rng = np.random.default_rng(seed)
    return decoder_inputs(Pipeline.load(folder), [random_scene(rng).caption() for _ in range(n)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path, help="the folder holding sdonnx-int8-ov/ and sdonnx-int8-ov-vae8/")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    for name in ("sdonnx-int8-ov", "sdonnx-int8-ov-vae8"):
        if not (args.work / name / "vae_decoder" / "model.onnx").is_file():
            raise SystemExit(f"{args.work / name} is missing: make it with benchmarks/prepare.py (see --help)")
    latents = final_latents(args.work / "sdonnx-int8-ov", args.n, args.seed)
    ref = run_onnxruntime(args.work / "sdonnx-int8-ov" / "vae_decoder" / "model.onnx", latents)
    std = np.mean([f["latent_sample"].std() for f in latents])
    print(f"{args.n} decodes, latent std {std:.2f}; PSNR against the fp32 decoder on ONNX Runtime:")
    for label, folder, run in (("int8 decoder, ONNX Runtime", "sdonnx-int8-ov-vae8", run_onnxruntime),
                               ("int8 decoder, OpenVINO", "sdonnx-int8-ov-vae8", run_openvino),
                               ("fp32 decoder, OpenVINO (bf16)", "sdonnx-int8-ov", run_openvino)):
        scores = [image_psnr(r, o) for r, o in zip(ref, run(args.work / folder / "vae_decoder" / "model.onnx",
                                                            latents))]
        print(f"  {label:32s} median {np.median(scores):5.1f} dB, lowest {min(scores):5.1f} dB")


if __name__ == "__main__":
    main()
