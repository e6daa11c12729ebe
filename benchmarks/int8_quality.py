"""int8 quality side by side: each system's U-Net output against diffusers' fp32 U-Net (PyTorch) on the same
inputs, as PSNR (export/verify.py's definition: the reference's range as the peak).

Inputs: guided batches ([unconditional, conditional] CLIP states of prompts that are not among the calibration
prompts, from diffusers' own text encoder), standard-normal latents, timesteps across the schedule. Each system
runs as the benchmark runs it: ours on OpenVINO's kernels (`--provider openvino`) or ONNX Runtime, OpenVINO's IRs
in its default precision (bf16 on this CPU). Random weights: this compares the quantizers on identical graphs and
inputs; it says nothing about picture quality of trained models.

    python benchmarks/int8_quality.py WORK [--size 256] [--name sd15-int8-quality-cpu]
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
# system -> (folder, graph file inside unet/, runner)
SYSTEMS = {"sdonnx-int8-ov": ("sdonnx-int8-ov", "model.onnx", "openvino"),
           "sdonnx-int8-qdq": ("sdonnx-int8-qdq", "model.onnx", "onnxruntime"),
           "openvino-int8": ("openvino-int8", "openvino_model.xml", "openvino"),
           "openvino-fp32": ("openvino-fp32", "openvino_model.xml", "openvino")}


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


def run_openvino(path: Path, feeds: list[dict]) -> list[np.ndarray]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    ports = {p.get_any_name(): p for p in model.inputs}
    shaped = {name: ov.PartialShape(list(feeds[0][name].shape)) for name in ports}
    model.reshape(shaped)
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
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--name", default="sd15-int8-quality-cpu")
    args = ap.parse_args()
    weights = args.work / "diffusers"
    feeds = inputs(weights, args.size)
    ref = reference(weights, feeds)
    # the measure is well-conditioned when a tiny input change moves the reference far less than the int8 error
    nudged = reference(weights, [dict(f, sample=f["sample"] + np.float32(1e-4)) for f in feeds[:1]])[0]
    result = {"size": args.size, "prompts": PROMPTS, "timesteps": TIMESTEPS,
              "reference": "diffusers UNet2DConditionModel fp32 (PyTorch)",
              "reference_psnr_under_1e-4_input_shift": psnr(ref[0], nudged), "systems": {}}
    for name in args.systems.split(","):
        folder, graph, runner = SYSTEMS[name]
        path = args.work / folder / "unet" / graph
        if not path.exists():
            print(f"{name}: {path} missing, skipped", flush=True)
            continue
        start = time.perf_counter()
        outs = (run_openvino if runner == "openvino" else run_onnxruntime)(path, feeds)
        scores = [psnr(r, o) for r, o in zip(ref, outs)]
        result["systems"][name] = {"psnr_db": [round(v, 2) for v in scores],
                                   "median_psnr_db": round(float(np.median(scores)), 2),
                                   "runner": runner, "seconds": round(time.perf_counter() - start, 1)}
        print(name, result["systems"][name], flush=True)
    out = HERE / "results" / args.name
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"# int8 quality: U-Net output PSNR against diffusers' fp32 U-Net, {args.size}x{args.size}", "",
             f"Command: `python benchmarks/int8_quality.py {args.work} --size {args.size} --name {args.name}`. "
             "Random weights (the benchmark's SD 1.5 folder); guided batches of 4 prompts outside the calibration "
             f"set at timesteps {', '.join(map(str, TIMESTEPS))}. A 1e-4 shift of the latents moves the reference "
             f"by {result['reference_psnr_under_1e-4_input_shift']:.1f} dB PSNR (far above every system's error).",
             "", "| system | runs on | PSNR per input (dB) | median dB |", "|---|---|---|---|"]
    for name, r in result["systems"].items():
        lines.append(f"| {name} | {r['runner']} | {', '.join(f'{v:.1f}' for v in r['psnr_db'])} | "
                     f"**{r['median_psnr_db']:.1f}** |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("wrote", out.with_suffix(".md"))


if __name__ == "__main__":
    main()
