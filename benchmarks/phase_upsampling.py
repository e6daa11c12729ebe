"""Upsampling as phase convolutions, timed: SD's VAE decoder traced with its upsamplers as they are (nearest
Resize, 3x3 Conv) and as four 2x2 convolutions and a DepthToSpace (what `sdonnx export` writes), on ONNX Runtime's
CPU kernels (fp32) and OpenVINO's (its default precision); and a U-Net graph on OpenVINO with and without the
rewrite `--provider openvino` makes of its upsamplers at load.

    python benchmarks/phase_upsampling.py WEIGHTS [--size 512] [--unet FOLDER/unet/model.onnx --batch 2]
    python benchmarks/phase_upsampling.py --size 512 --onnxruntime-unets PLAIN/unet/model.onnx PHASED/unet/model.onnx

--onnxruntime-unets times two U-Net graphs on ONNX Runtime: e.g. two `--static` exports, one made with the
threshold `sdonnx.upsampling.MIN_CHANNELS` raised past every layer (plain) and one as `sdonnx export` makes it.

WEIGHTS: a diffusers folder or single-file checkpoint (its VAE is exported twice into a temporary folder). The two
forms of each graph are timed interleaved (medians of --runs calls), and each pair's largest difference is
printed: the forms compute the same values.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def export_decoders(weights: Path, out: Path) -> dict[str, Path]:
    """vae_decoder graphs of `weights`, plain and with phase upsampling (fp32, dynamic sizes, ORT-optimized)."""
    from sdonnx.export import onnx as graphs, optimize
    from sdonnx.export.weights import build_models, load_checkpoint

    ckpt = load_checkpoint(weights)
    models = {"vae": build_models(ckpt)["vae"]}  # the checkpoint's tensors, shared
    paths = {}
    for form in ("plain", "phases"):
        if form == "phases":
            graphs.use_phase_upsampling(models["vae"])
        module = graphs.wrap("vae_decoder", models)
        inputs = graphs.sample_inputs("vae_decoder", ckpt.configs, 1, (16, 16))
        raw = graphs.export_component("vae_decoder", module, inputs, out / form / "raw" / "model.onnx")
        paths[form] = optimize.optimize(raw, out / form / "model.onnx")
    return paths


def onnxruntime_runner(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)[0]


def openvino_runner(path: Path, feed: dict, threads: int, rewrite: bool):
    import openvino as ov

    from sdonnx.openvino_rewrites import phase_upsampling

    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({k: list(v.shape) for k, v in feed.items()})
    count = phase_upsampling(model) if rewrite else 0
    request = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                "INFERENCE_NUM_THREADS": threads}).create_infer_request()
    return (lambda f: np.array(request.infer(f)[0], copy=True)), count


def interleaved(runners: dict, feed: dict, runs: int) -> dict[str, tuple[float, np.ndarray]]:
    """{name: (median seconds, output)} after two warm-up calls each."""
    outs = {name: (run(feed), run(feed))[1] for name, run in runners.items()}
    times = {name: [] for name in runners}
    for _ in range(runs):
        for name, run in runners.items():
            start = time.perf_counter()
            run(feed)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), outs[name]) for name, t in times.items()}


def report(title: str, pairs: list[tuple[str, str]], results: dict) -> None:
    print(title)
    for base, other in pairs:
        (t0, y0), (t1, y1) = results[base], results[other]
        print(f"  {base:34s} {1e3 * t0:8.1f} ms")
        print(f"  {other:34s} {1e3 * t1:8.1f} ms  ({t1 / t0:.2f}x; largest difference {np.abs(y1 - y0).max():.3g} "
              f"of values up to {np.abs(y0).max():.3g})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", type=Path, nargs="?", help="the VAE's weights (skip the VAE without)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--unet", type=Path, help="a U-Net graph to time on OpenVINO with and without the rewrite")
    ap.add_argument("--batch", type=int, default=2, help="the U-Net's batch (2: a guided step)")
    ap.add_argument("--text", type=int, default=768, help="the U-Net's text width (768 SD 1.x, 1024 SD 2.x)")
    ap.add_argument("--onnxruntime-unets", type=Path, nargs=2, metavar=("PLAIN", "PHASED"),
                    help="two U-Net graphs (e.g. --static exports without and with phase upsampling) on ONNX Runtime")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    side = args.size // 8
    if args.weights is not None:
        with tempfile.TemporaryDirectory() as tmp:
            paths = export_decoders(args.weights, Path(tmp))
            feed = {"latent_sample": rng.standard_normal((1, 4, side, side), dtype=np.float32)}
            runners = {f"onnxruntime fp32, {form}": onnxruntime_runner(path, args.threads)
                       for form, path in paths.items()}
            runners.update({f"openvino default, {form}": openvino_runner(path, feed, args.threads, False)[0]
                            for form, path in paths.items()})
            results = interleaved(runners, feed, args.runs)
        report(f"VAE decoder, {args.size}x{args.size}, batch 1 ({args.weights})",
               [("onnxruntime fp32, plain", "onnxruntime fp32, phases"),
                ("openvino default, plain", "openvino default, phases")], results)
    feed = {"sample": rng.standard_normal((args.batch, 4, side, side), dtype=np.float32),
            "timestep": np.array(999.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((args.batch, 77, args.text), dtype=np.float32)}
    if args.onnxruntime_unets is not None:
        plain, phased = args.onnxruntime_unets
        results = interleaved({"onnxruntime, plain": onnxruntime_runner(plain, args.threads),
                               "onnxruntime, phases": onnxruntime_runner(phased, args.threads)}, feed, args.runs)
        report(f"U-Net, {args.size}x{args.size}, batch {args.batch} ({plain}, {phased})",
               [("onnxruntime, plain", "onnxruntime, phases")], results)
    if args.unet is not None:
        plain, _ = openvino_runner(args.unet, feed, args.threads, False)
        phases, count = openvino_runner(args.unet, feed, args.threads, True)
        results = interleaved({"openvino, as read": plain, f"openvino, {count} upsamplers rewritten": phases},
                              feed, args.runs)
        report(f"U-Net, {args.size}x{args.size}, batch {args.batch} ({args.unet})",
               [("openvino, as read", f"openvino, {count} upsamplers rewritten")], results)


if __name__ == "__main__":
    main()
