"""Where a U-Net's (or a VAE decoder's) time goes on OpenVINO's CPU kernels (PERF_COUNT), and what-if timings of
more int8.

    python benchmarks/openvino_profile.py UNET.onnx [--size 512] [--batch 1] [--text 1024]
    python benchmarks/openvino_profile.py VAE_DECODER.onnx --size 512 --what-if .   (SD's 8x VAE)
    python benchmarks/openvino_profile.py UNET.onnx --what-if attention
    python benchmarks/openvino_profile.py UNET.onnx --what-if "upsamplers|downsamplers|conv_shortcut"
    python benchmarks/openvino_profile.py UNET.onnx --against OTHER/unet/model.onnx   (two exports, interleaved)
    python benchmarks/openvino_profile.py VAE_DECODER.onnx --size 512 --without group_norms   (one load-time rewrite)
    python benchmarks/openvino_profile.py VAE_DECODER.onnx --size 512 --without group_norms --profile

The profile sums OpenVINO's per-node times by node type and kernel (e.g. brgconv_avx512_I8 = an int8
convolution, jit_avx512_bf16 = bf16). --what-if inserts QuantizeLinear/DequantizeLinear pairs with fixed,
uncalibrated scales (speed only: the numbers of the result are meaningless) on both inputs of the attention
products, or on the float convolutions whose node names match the pattern, and times the original and the
modified graph interleaved (medians of --runs calls); --against times two graphs of the same inputs (e.g. two
exports' U-Nets) the same way; --without times the graph compiled as `--provider openvino` compiles it against the
same without the named load-time rewrites (`sdonnx.openvino_rewrites`). Our ONNX graphs are compiled as
`--provider openvino` compiles them (with its rewrites); OpenVINO IRs (.xml) as they are."""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import time
from pathlib import Path

import numpy as np
import onnx


def feeds(model, size: int, batch: int, text: int) -> dict[str, np.ndarray]:
    import openvino as ov

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((batch, 4, size // 8, size // 8)).astype(np.float32)
    values = {"sample": latents, "latent_sample": latents,
              "timestep": np.array([999]), "encoder_hidden_states":
              rng.standard_normal((batch, 77, text)).astype(np.float32)}
    out = {}
    for port in model.inputs:
        name = port.get_any_name()
        if name not in values:
            raise SystemExit(f"input {name} is not one this script feeds (a U-Net's sample, timestep and "
                             "encoder_hidden_states, or a VAE decoder's latent_sample)")
        out[name] = values[name].astype(port.get_element_type().to_dtype())
    model.reshape({k: ov.PartialShape(list(v.shape)) for k, v in out.items()})
    return out


def compiled(path: Path, args, perf: bool = False, skip: tuple[str, ...] = ()):
    import openvino as ov

    from sdonnx import openvino_rewrites

    core = ov.Core()
    model = core.read_model(str(path))
    feed = feeds(model, args.size, args.batch, args.text)
    if path.suffix == ".onnx":
        print(f"  {path.name}: rewritten at load {openvino_rewrites.apply(model, skip)}")
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": args.threads, "PERF_COUNT": perf}
    request = core.compile_model(model, "CPU", config).create_infer_request()
    for _ in range(2):
        request.infer(feed)
    return request, feed


def profile(path: Path, args, skip: tuple[str, ...] = ()) -> None:
    request, _ = compiled(path, args, perf=True, skip=skip)
    by_type, by_kernel, count = collections.Counter(), collections.Counter(), collections.Counter()
    for p in request.get_profiling_info():
        ms = p.real_time.total_seconds() * 1e3
        by_type[p.node_type] += ms
        by_kernel[(p.node_type, p.exec_type)] += ms
        count[p.node_type] += 1
    total = sum(by_type.values())
    print(f"total {total:.0f} ms (one call, {args.size}x{args.size}, batch {args.batch})")
    for kind, ms in by_type.most_common(10):
        print(f"  {kind:24s} {ms:8.1f} ms {100 * ms / total:5.1f}%  ({count[kind]} nodes)")
    print("by kernel:")
    for (kind, kernel), ms in by_kernel.most_common(12):
        print(f"  {kind:24s} {kernel:28s} {ms:8.1f} ms")


def _dequantized(graph: onnx.GraphProto, name: str, scale: float, zero: int, signed: bool, added: list) -> str:
    s, z = name + "_whatif_scale", name + "_whatif_zero"
    graph.initializer.extend([onnx.numpy_helper.from_array(np.array(scale, np.float32), s),
                              onnx.numpy_helper.from_array(np.array(zero, np.int8 if signed else np.uint8), z)])
    added += [onnx.helper.make_node("QuantizeLinear", [name, s, z], [name + "_whatif_q"]),
              onnx.helper.make_node("DequantizeLinear", [name + "_whatif_q", s, z], [name + "_whatif_dq"])]
    return name + "_whatif_dq"


def what_if(src: Path, which: str) -> Path:
    """A copy of the graph (sharing its data file) with the chosen float products in QDQ int8."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    made = {o: n for n in graph.node for o in n.output}

    def quantized(name: str) -> bool:
        return name in inits or (name in made and made[name].op_type == "DequantizeLinear")

    added, done = [], {}
    if which == "attention":
        nodes = [n for n in graph.node if n.op_type == "MatMul" and not any(quantized(x) for x in n.input)]
        for node in nodes:
            for i, x in enumerate(node.input):
                if x not in done:
                    probabilities = x in made and made[x].op_type == "Softmax"
                    done[x] = _dequantized(graph, x, 1 / 255 if probabilities else 16 / 255,
                                           0 if probabilities else 128, False, added)
                node.input[i] = done[x]
    else:
        pattern = re.compile(which)
        nodes = [n for n in graph.node if n.op_type == "Conv" and pattern.search(n.name)
                 and not quantized(n.input[0])]
        for node in nodes:
            node.input[0] = _dequantized(graph, node.input[0], 0.05, 128, False, added)
            node.input[1] = _dequantized(graph, node.input[1], 0.001, 0, True, added)
    print(f"what-if {which!r}: {len(nodes)} nodes made int8")
    graph.node.extend(added)
    onx = ONNXModel(model)
    onx.topological_sort()
    out = src.with_name(src.stem + "_whatif.onnx")
    onnx.save_model(onx.model, str(out))
    return out


def compare(src: Path, which: str, args) -> None:
    changed = what_if(src, which)
    try:
        interleaved({"as exported": (src, ()), "what-if": (changed, ())}, args)
    finally:
        changed.unlink(missing_ok=True)


def interleaved(graphs: dict[str, tuple[Path, tuple[str, ...]]], args) -> None:
    """Each graph's median time over --runs calls, taken in turn, relative to the first's; each is compiled
    without the load-time rewrites named beside it."""
    requests = {key: compiled(path, args, skip=skip) for key, (path, skip) in graphs.items()}
    outputs = [np.array(request.infer(feed)[0], copy=True) for request, feed in requests.values()]
    if all(o.shape == outputs[0].shape for o in outputs):
        print(f"  largest difference from the first: {max(float(np.abs(o - outputs[0]).max()) for o in outputs):.3g}"
              f" (values up to {float(np.abs(outputs[0]).max()):.3g})")
    times = {k: [] for k in requests}
    for _ in range(args.runs):
        for key, (request, feed) in requests.items():
            start = time.perf_counter()
            request.infer(feed)
            times[key].append(time.perf_counter() - start)
    base = statistics.median(next(iter(times.values())))
    for key, values in times.items():
        median = statistics.median(values)
        print(f"  {key:44s} median {1e3 * median:7.1f} ms ({median / base:.3f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("unet", type=Path)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text", type=int, default=1024, help="text states' width: 768 SD 1.x, 1024 SD 2.x")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--what-if", default=None, metavar="attention|REGEX")
    ap.add_argument("--against", type=Path, help="a second graph of the same inputs, timed interleaved with the first")
    ap.add_argument("--without", default=None, metavar="REWRITE[,REWRITE]",
                    help="time the graph with every load-time rewrite against the same without these")
    ap.add_argument("--profile", action="store_true", help="with --without: profile the graph without them instead")
    args = ap.parse_args()
    if args.without:
        from sdonnx import openvino_rewrites

        skip = tuple(args.without.split(","))
        try:
            openvino_rewrites.check(skip)
        except ValueError as err:
            raise SystemExit(f"--without: {err}") from None
        if args.profile:
            return profile(args.unet, args, skip)
        interleaved({"with every rewrite": (args.unet, ()), f"without {args.without}": (args.unet, skip)}, args)
    elif args.against:
        first, second = (f"{p.parent.parent.name}/{p.parent.name}/{p.name}" for p in (args.unet, args.against))
        interleaved({first: (args.unet, ()), second if second != first else second + " (again)": (args.against, ())},
                    args)
    elif args.what_if:
        compare(args.unet, args.what_if, args)
    else:
        profile(args.unet, args)


if __name__ == "__main__":
    main()
