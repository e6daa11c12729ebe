"""An OpenVINO folder whose VAE is our export's tiny VAE (TAESD), as diffusers runs pipe.vae = AutoencoderTiny.

    models/peers/openvino/bin/python benchmarks/openvino_tiny_vae.py OPENVINO_DIR SDONNX_DIR OUT_DIR

Runs in the OpenVINO venv (benchmarks/peers.py). OUT_DIR is OPENVINO_DIR with every file hard-linked (no copies)
except vae_decoder/ and vae_encoder/: those hold SDONNX_DIR's vae_decoder_tiny / vae_encoder_tiny ONNX graphs
converted to OpenVINO IR (openvino_model.xml/.bin, the names optimum-intel's pipeline loads), with their
config.json. That config is AutoencoderTiny's: scaling factor 1, so the pipeline scales latents as diffusers does
with the tiny VAE, and block_out_channels, from which the pipeline takes its vae_scale_factor. The graphs' names
are the ones optimum-intel feeds and reads: the decoder maps latent_sample -> sample, the encoder sample ->
latent_sample, which it returns as `latents` (AutoencoderTiny's own output). The weights stay fp32 in every
folder, the int8 one too: our int8 exports keep the tiny VAE fp32 as well.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

PARTS = ("vae_decoder", "vae_encoder")
IR = "openvino_model.xml"  # optimum-intel's file name for every part


def convert(onnx: Path, out_dir: Path) -> None:
    """One ONNX graph -> out_dir/openvino_model.xml (+ .bin), weights kept fp32 (save_model would halve them)."""
    import openvino

    out_dir.mkdir(parents=True)
    openvino.save_model(openvino.convert_model(str(onnx)), str(out_dir / IR), compress_to_fp16=False)
    shutil.copy2(onnx.parent / "config.json", out_dir / "config.json")


def with_tiny_vae(openvino_dir: Path, ours: Path, out: Path) -> Path:
    """Made in OUT.tmp and renamed when complete, so an interrupted run leaves no half folder under OUT."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    shutil.copytree(openvino_dir, tmp, copy_function=os.link, ignore=lambda d, names: PARTS if Path(d) == openvino_dir
                    else ())
    for part in PARTS:
        convert(ours / f"{part}_tiny" / "model.onnx", tmp / part)
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("openvino_dir", type=Path, help="an OpenVINO folder (optimum-cli export openvino, or its int8)")
    ap.add_argument("sdonnx_dir", type=Path, help="our export of the same weights with --tiny-vae")
    ap.add_argument("out", type=Path)
    a = ap.parse_args()
    if not (a.openvino_dir / "unet" / IR).is_file():
        ap.error(f"{a.openvino_dir} holds no OpenVINO U-Net (unet/{IR})")
    missing = [p for p in PARTS if not (a.sdonnx_dir / f"{p}_tiny" / "model.onnx").is_file()]
    if missing:
        ap.error(f"{a.sdonnx_dir} has no tiny VAE ({missing[0]}_tiny/model.onnx): export it with --tiny-vae")
    if a.out.exists():
        ap.error(f"{a.out} exists")
    with_tiny_vae(a.openvino_dir, a.sdonnx_dir, a.out)


if __name__ == "__main__":
    main()
