"""OpenVINO's hybrid int8 folder, made as optimum-intel makes it, calibrated on our own prompts (no dataset download).

    models/peers/openvino/bin/python benchmarks/openvino_int8.py FP32_IR_DIR OUT_DIR --prompt P [--prompt P ...]
                                                                  [--steps 10] [--guidance 7.5] [--size PIXELS]

Runs in the OpenVINO venv (benchmarks/peers.py). Hybrid quantization is optimum-intel's
`OVWeightQuantizationConfig(bits=8, quant_method="hybrid")`: every model gets int8 weights; in the U-Net NNCF also
quantizes the activations of the convolutions and of the weightless matmuls (attention), with ranges from the
calibration set. optimum-intel would build that set by running the pipeline on a hub dataset's captions at its
default 50 steps; here the same pipeline runs our prompts (the ones our qdq export calibrates on, passed by
prepare.py) for --steps steps each, guided at --guidance (SD's 7.5 unless the weights suggest another: prepare.py
passes the one our export calibrates at, e.g. the tiny model's 3.0), and every U-Net call's inputs are kept, as
optimum-intel's own collector keeps them; the set then goes to OVQuantizer as a ready calibration dataset.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

GUIDANCE = 7.5  # SD's default, which our calibration and the timed generations of SD use too
MAX_LATENT = 32  # as our qdq export: activation ranges barely depend on size, calibration time does


def calibration_set(pipe, prompts: list[str], steps: int, size: int, guidance: float) -> list[dict]:
    """The U-Net's inputs along one guided generation per prompt (optimum-intel's InferRequestWrapper collects)."""
    import torch
    from optimum.intel.openvino.quantization import InferRequestWrapper

    pipe.compile()
    feeds: list[dict] = []
    unet = pipe.unet
    unet.request = InferRequestWrapper(unet.request, feeds)
    try:
        for i, prompt in enumerate(prompts):
            pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                 generator=torch.Generator().manual_seed(i), output_type="latent")
    finally:
        unet.request = unet.request.request
    return feeds


def quantize(fp32_dir: Path, out: Path, prompts: list[str], steps: int, size: int | None,
             guidance: float) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: no hub look-up (none is reachable here)
    from optimum.intel import OVConfig, OVQuantizer, OVStableDiffusionPipeline, OVWeightQuantizationConfig

    pipe = OVStableDiffusionPipeline.from_pretrained(fp32_dir, compile=False)
    pipe.set_progress_bar_config(disable=True)
    if size is None:
        size = min(int(pipe.unet.config.get("sample_size", MAX_LATENT)), MAX_LATENT) * pipe.vae_scale_factor
    feeds = calibration_set(pipe, prompts, steps, size, guidance)
    print(f"calibration: {len(feeds)} U-Net inputs ({len(prompts)} prompts x {steps} steps, {size}x{size}, "
          f"guidance {guidance})", file=sys.stderr, flush=True)
    config = OVWeightQuantizationConfig(bits=8, quant_method="hybrid", num_samples=len(feeds))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    import nncf

    OVQuantizer(pipe).quantize(calibration_dataset={"unet": nncf.Dataset(feeds)},
                               ov_config=OVConfig(quantization_config=config), save_directory=tmp)
    tmp.rename(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fp32_dir", type=Path, help="optimum-cli export openvino --weight-format fp32 of the weights")
    ap.add_argument("out", type=Path)
    ap.add_argument("--prompt", action="append", required=True, help="a calibration prompt (repeat)")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps of each calibration generation")
    ap.add_argument("--guidance", type=float, default=GUIDANCE, help="guidance scale of the calibration generations")
    ap.add_argument("--size", type=int, default=None,
                    help=f"calibration image side in pixels (default: the U-Net's, at most {MAX_LATENT} latents)")
    a = ap.parse_args()
    if not (a.fp32_dir / "unet" / "openvino_model.xml").is_file():
        ap.error(f"{a.fp32_dir} holds no OpenVINO U-Net (unet/openvino_model.xml)")
    if a.out.exists():
        ap.error(f"{a.out} exists")
    quantize(a.fp32_dir, a.out, a.prompt, a.steps, a.size, a.guidance)


if __name__ == "__main__":
    main()
