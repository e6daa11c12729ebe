"""OpenVINO's own pipeline's pictures for given captions and starting noise, for our evaluators to judge.

    models/peers/openvino/bin/python benchmarks/openvino_images.py OPENVINO_DIR REQUEST.npz OUT.npz [--precision f32]

Runs in the OpenVINO venv (benchmarks/peers.py): optimum-intel's OVStableDiffusionPipeline on an IR folder (the fp32
one or its hybrid int8), with static shapes as FastSD runs it, and its folder's own scheduler. REQUEST.npz holds
`captions` (N strings), `latents` (N, C, h, w: unit-variance starting noise, which the pipeline scales by its
scheduler's initial sigma, as ours does), `steps`, `guidance` and `size` (pixels). The noise is passed in rather than
drawn from a seed because the two runtimes' generators differ; with a sampler that adds no noise after the start
(DDIM, eta 0) the two pipelines then see the same inputs all the way. OUT.npz gets `images` (N, size, size, 3 uint8),
`precision` (the U-Net's inference precision), `scheduler` (its class), `seconds` (generation only, after compiling).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REQUEST_KEYS = ("captions", "latents", "steps", "guidance", "size")


def load_pipeline(folder: Path, size: int, precision: str | None):
    """The folder's pipeline reshaped to one size x size picture per prompt (batch 1, U-Net batch 2) and compiled."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: no hub look-up (none is reachable here)
    from optimum.intel import OVStableDiffusionPipeline

    config = {} if precision is None else {"INFERENCE_PRECISION_HINT": precision}
    pipe = OVStableDiffusionPipeline.from_pretrained(folder, compile=False, ov_config=config)
    pipe.set_progress_bar_config(disable=True)
    pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
    pipe.compile()
    return pipe


def draw(pipe, captions: list[str], latents: np.ndarray, steps: int, guidance: float, size: int) -> np.ndarray:
    """One uint8 picture per caption, each from its own starting noise."""
    import torch

    out = []
    for caption, noise in zip(captions, latents):
        image = pipe(caption, negative_prompt="", num_inference_steps=steps, guidance_scale=guidance, height=size,
                     width=size, latents=torch.from_numpy(noise[None].copy()), output_type="np").images[0]
        out.append((image * 255.0).round().clip(0, 255).astype(np.uint8))  # as our runtime rounds [0, 1] pixels
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="an OpenVINO IR folder (optimum-cli export openvino, or its int8)")
    ap.add_argument("request", type=Path, help="npz with " + ", ".join(REQUEST_KEYS))
    ap.add_argument("out", type=Path, help="npz to write (images, precision, scheduler, seconds)")
    ap.add_argument("--precision", choices=["f32", "bf16"], default=None,
                    help="INFERENCE_PRECISION_HINT (default: OpenVINO's own, bf16 on CPUs with AVX512-BF16 or AMX)")
    a = ap.parse_args()
    if not (a.folder / "unet" / "openvino_model.xml").is_file():
        ap.error(f"{a.folder} holds no OpenVINO U-Net (unet/openvino_model.xml)")
    with np.load(a.request) as req:
        missing = [k for k in REQUEST_KEYS if k not in req]
        if missing:
            ap.error(f"{a.request} lacks {', '.join(missing)}")
        captions, latents = [str(c) for c in req["captions"]], req["latents"].astype(np.float32)
        steps, guidance, size = int(req["steps"]), float(req["guidance"]), int(req["size"])
    if len(captions) != len(latents):
        ap.error(f"{a.request}: {len(captions)} captions but {len(latents)} latents")
    pipe = load_pipeline(a.folder, size, a.precision)
    start = time.perf_counter()
    images = draw(pipe, captions, latents, steps, guidance, size)
    seconds = time.perf_counter() - start
    precision = pipe.unet.request.get_property("INFERENCE_PRECISION_HINT").to_string()
    tmp = a.out.with_name(a.out.name + ".tmp.npz")  # written whole, then renamed: no half file under OUT
    np.savez(tmp, images=images, precision=precision, scheduler=type(pipe.scheduler).__name__, seconds=seconds)
    tmp.rename(a.out)
    print(f"{len(images)} pictures in {seconds:.1f} s ({precision}, {type(pipe.scheduler).__name__})", file=sys.stderr)


if __name__ == "__main__":
    main()
