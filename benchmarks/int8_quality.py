"""int8 quality side by side: each system's U-Net output against diffusers' fp32 U-Net (PyTorch) on the same
inputs, as PSNR (export/verify.py's definition: the reference's range as the peak); with --component vae_decoder,
each system's decoded image against diffusers' fp32 VAE decoder.

Inputs: guided batches ([unconditional, conditional] CLIP states of prompts that are not among the calibration
prompts, from diffusers' own text encoder), standard-normal latents, timesteps across the schedule. Each system
runs as the benchmark runs it: ours on OpenVINO's kernels (`--provider openvino`) or ONNX Runtime, OpenVINO's IRs
in its default precision (bf16 on this CPU). Random weights: this compares the quantizers on identical graphs and
inputs; it says nothing about picture quality of trained models.

VAE decoder inputs: what the decoder is handed at the end of a generation, i.e. the final latents of our runtime's
txt2img (the `openvino`-scheme folder on OpenVINO's kernels, 10 DDIM steps, the U-Net inputs' prompts and seeds,
none of the calibration's), divided by the scaling factor. Its PSNR is the image's: both images clipped to
[-1, 1], the range the runtime turns into pixels, with peak 2 (so 8-bit pictures' usual PSNR).

    python benchmarks/int8_quality.py WORK [--size 256] [--name sd15-int8-quality-cpu]
    python benchmarks/int8_quality.py WORK --component vae_decoder --size 512 --name sd15-vae-int8-quality-cpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

PROMPTS = ("a bowl of fruit on a wooden table", "a mountain lake at dawn, mist over the water",
           "a watercolor of a fox in the snow", "a robot reading a book in a library")
TIMESTEPS = (981, 741, 501, 261)
# system -> (folder, graph file inside the component's folder, runner)
SYSTEMS = {"sdonnx-int8-ov": ("sdonnx-int8-ov", "model.onnx", "openvino"),
           "sdonnx-int8-qdq": ("sdonnx-int8-qdq", "model.onnx", "onnxruntime"),
           "openvino-int8": ("openvino-int8", "openvino_model.xml", "openvino"),
           "openvino-fp32": ("openvino-fp32", "openvino_model.xml", "openvino"),
           # --int8-vae: its decoder static int8, on OpenVINO's kernels and on ONNX Runtime
           "sdonnx-int8-ov-vae8": ("sdonnx-int8-ov-vae8", "model.onnx", "openvino"),
           "sdonnx-int8-vae8-ort": ("sdonnx-int8-ov-vae8", "model.onnx", "onnxruntime")}
DEFAULT_SYSTEMS = {"unet": ("sdonnx-int8-ov", "sdonnx-int8-qdq", "openvino-int8", "openvino-fp32"),
                   # sdonnx-int8-ov's decoder is the fp32 graph (OpenVINO runs it in bf16, as openvino-fp32's)
                   "vae_decoder": ("sdonnx-int8-ov-vae8", "sdonnx-int8-vae8-ort", "sdonnx-int8-ov",
                                   "openvino-int8", "openvino-fp32")}


def inputs(weights: Path, size: int) -> list[dict[str, np.ndarray]]:
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(weights / "tokenizer")
    enc = CLIPTextModel.from_pretrained(weights / "text_encoder").eval()

    def states(text: str) -> np.ndarray:
        ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            return enc(ids)[0].numpy()

    empty = states("")
    rng = np.random.default_rng(0)
    out = []
    for prompt, t in zip(PROMPTS, TIMESTEPS):
        out.append({"sample": rng.standard_normal((2, 4, size // 8, size // 8)).astype(np.float32),
                    "timestep": np.array([t], np.int64),
                    "encoder_hidden_states": np.concatenate([empty, states(prompt)]).astype(np.float32)})
    return out


def reference(weights: Path, feeds: list[dict]) -> list[np.ndarray]:
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(weights / "unet").eval()
    with torch.no_grad():
        return [unet(torch.from_numpy(f["sample"]), int(f["timestep"][0]),
                     torch.from_numpy(f["encoder_hidden_states"])).sample.numpy() for f in feeds]


def vae_inputs(work: Path, size: int, steps: int = 10) -> list[dict[str, np.ndarray]]:
    from sdonnx import Pipeline

    pipe = Pipeline.load(work / SYSTEMS["sdonnx-int8-ov"][0], provider="openvino")
    return decoder_inputs(pipe, PROMPTS, steps=steps, scheduler="ddim", width=size, height=size)


def decoder_inputs(pipe, prompts, **options) -> list[dict[str, np.ndarray]]:
    """What the VAE decoder is handed at the end of one txt2img per prompt (its index as the seed): the final
    latents over the scaling factor."""
    out = []
    for seed, prompt in enumerate(prompts):
        ends = []
        pipe.txt2img(prompt, seed=seed, output_type="np", **options,
                     callback=lambda k, total, latents: ends.append(latents) if k == total - 1 else None)
        out.append({"latent_sample": (ends[-1] / np.float32(pipe.info.scaling_factor)).astype(np.float32)})
    return out


def vae_reference(weights: Path, feeds: list[dict]) -> list[np.ndarray]:
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(weights / "vae").eval()
    with torch.no_grad():
        return [vae.decode(torch.from_numpy(f["latent_sample"])).sample.numpy() for f in feeds]


def image_psnr(reference: np.ndarray, output: np.ndarray) -> float:
    mse = float(np.mean((np.clip(reference, -1, 1) - np.clip(output, -1, 1)).astype(np.float64) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4 / mse)


def run_openvino(path: Path, feeds: list[dict]) -> list[np.ndarray]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    ports = {p.get_any_name(): p for p in model.inputs}
    shaped = {name: ov.PartialShape(list(feeds[0][name].shape)) for name in ports}
    model.reshape(shaped)
    if path.suffix == ".onnx":  # ours, compiled as `--provider openvino` compiles it
        from sdonnx import openvino_rewrites

        print(f"  {path.parent.name}: rewritten at load {openvino_rewrites.apply(model)}")
    compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 2})
    out = []
    for f in feeds:
        feed = {}
        for name, port in ports.items():
            kind = port.get_element_type().to_dtype()
            feed[name] = f[name].astype(kind)
        out.append(np.asarray(compiled(feed)[compiled.outputs[0]]))
    return out


def run_onnxruntime(path: Path, feeds: list[dict]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    kinds = {i.name: np.float32 if i.type == "tensor(float)" else np.int64 for i in session.get_inputs()}
    return [session.run(None, {k: v.astype(kinds[k]) for k, v in f.items() if k in kinds})[0] for f in feeds]


def main() -> None:
    from sdonnx.export.verify import psnr

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path, help="the benchmark's model folders (diffusers/ and the systems' folders)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--component", choices=tuple(DEFAULT_SYSTEMS), default="unet")
    ap.add_argument("--systems", default=None, help=f"default: per component; any of {', '.join(SYSTEMS)}")
    ap.add_argument("--name", default="sd15-int8-quality-cpu")
    args = ap.parse_args()
    weights = args.work / "diffusers"
    unet = args.component == "unet"
    feeds = inputs(weights, args.size) if unet else vae_inputs(args.work, args.size)
    ref = (reference if unet else vae_reference)(weights, feeds)
    key = "sample" if unet else "latent_sample"
    # the measure is well-conditioned when a tiny input change moves the reference far less than the int8 error
    nudged = (reference if unet else vae_reference)(weights, [dict(f, **{key: f[key] + np.float32(1e-4)})
                                                             for f in feeds[:1]])[0]
    score = psnr if unet else image_psnr
    result = {"size": args.size, "component": args.component,
              "reference": "diffusers UNet2DConditionModel fp32 (PyTorch)" if unet else
              "diffusers AutoencoderKL.decode fp32 (PyTorch)",
              "reference_psnr_under_1e-4_input_shift": score(ref[0], nudged), "systems": {}}
    result["prompts"] = PROMPTS
    if unet:
        result["timesteps"] = TIMESTEPS
    else:
        result["latent_std"] = [round(float(f[key].std()), 3) for f in feeds]
        # clipping hides errors beyond [-1, 1]: how much of the reference it touches
        result["reference_clipped_fraction"] = round(float(np.mean([np.mean(np.abs(r) > 1) for r in ref])), 4)
    for name in (args.systems.split(",") if args.systems else DEFAULT_SYSTEMS[args.component]):
        if name not in SYSTEMS:
            raise SystemExit(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
        folder, graph, runner = SYSTEMS[name]
        path = args.work / folder / args.component / graph
        if not path.exists():
            print(f"{name}: {path} missing, skipped", flush=True)
            continue
        start = time.perf_counter()
        outs = (run_openvino if runner == "openvino" else run_onnxruntime)(path, feeds)
        scores = [score(r, o) for r, o in zip(ref, outs)]
        result["systems"][name] = {"psnr_db": [round(v, 2) for v in scores],
                                   "median_psnr_db": round(float(np.median(scores)), 2),
                                   "runner": runner, "seconds": round(time.perf_counter() - start, 1)}
        print(name, result["systems"][name], flush=True)
    out = HERE / "results" / args.name
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    shift = (f"A 1e-4 shift of the latents moves the reference by {result['reference_psnr_under_1e-4_input_shift']:.1f} "
             "dB PSNR (far above every system's error).")
    command = (f"Command: `python benchmarks/int8_quality.py {args.work}{'' if unet else ' --component vae_decoder'}"
               f"{f' --systems {args.systems}' if args.systems else ''} --size {args.size} --name {args.name}`. ")
    if unet:
        title = f"U-Net output PSNR against diffusers' fp32 U-Net, {args.size}x{args.size}"
        setup = ("Random weights (the benchmark's SD 1.5 folder); guided batches of 4 prompts outside the calibration "
                 f"set at timesteps {', '.join(map(str, TIMESTEPS))}. ")
    else:
        title = f"decoded image PSNR against diffusers' fp32 VAE decoder, {args.size}x{args.size}"
        setup = ("Random weights (the benchmark's SD 1.5 folder); the decoder's inputs are the final latents of 4 "
                 "of our txt2img runs (10 DDIM steps, prompts outside the calibration set) over the scaling factor "
                 f"(std {', '.join(map(str, result['latent_std']))}: a random U-Net's sampling drifts far from a "
                 "trained one's unit-variance latents); both images clipped to [-1, 1], peak 2 (the clipping "
                 f"touches {100 * result['reference_clipped_fraction']:.1f}% of the reference's values). ")
    lines = [f"# int8 quality: {title}", "", command + setup + shift,
             "", "| system | runs on | PSNR per input (dB) | median dB |", "|---|---|---|---|"]
    for name, r in result["systems"].items():
        lines.append(f"| {name} | {r['runner']} | {', '.join(f'{v:.1f}' for v in r['psnr_db'])} | "
                     f"**{r['median_psnr_db']:.1f}** |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("wrote", out.with_suffix(".md"))


if __name__ == "__main__":
    main()
