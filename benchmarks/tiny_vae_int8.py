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


def final_latents(folder: Path, n: int, seed: int) -> list[np.ndarray]:
    from sdonnx import Pipeline
    from sdonnx.export.tiny.shapes import random_scene

    pipe = Pipeline.load(folder)
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        ends: list = []
        pipe.txt2img(random_scene(rng).caption(), seed=k, output_type="np",
                     callback=lambda i, total, x: ends.append(x) if i == total - 1 else None)
        out.append((ends[-1] / np.float32(pipe.info.scaling_factor)).astype(np.float32))
    return out


def decode(path: Path, latents: list[np.ndarray], runner: str) -> list[np.ndarray]:
    if runner == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": 2})
        return [np.asarray(compiled([x])[0]) for x in latents]
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [session.run(None, {"latent_sample": x})[0] for x in latents]


def image_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(4 / np.mean((np.clip(a, -1, 1) - np.clip(b, -1, 1)).astype(np.float64) ** 2)))


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
    ref = decode(args.work / "sdonnx-int8-ov" / "vae_decoder" / "model.onnx", latents, "onnxruntime")
    print(f"{args.n} decodes, latent std {np.mean([x.std() for x in latents]):.2f}; PSNR against the fp32 decoder "
          "on ONNX Runtime:")
    for label, folder, runner in (("int8 decoder, ONNX Runtime", "sdonnx-int8-ov-vae8", "onnxruntime"),
                                  ("int8 decoder, OpenVINO", "sdonnx-int8-ov-vae8", "openvino"),
                                  ("fp32 decoder, OpenVINO (bf16)", "sdonnx-int8-ov", "openvino")):
        scores = [image_psnr(r, o) for r, o in zip(ref, decode(args.work / folder / "vae_decoder" / "model.onnx",
                                                               latents, runner))]
        print(f"  {label:32s} median {np.median(scores):5.1f} dB, lowest {min(scores):5.1f} dB")


if __name__ == "__main__":
    main()
