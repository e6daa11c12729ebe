"""One self-attention on OpenVINO's CPU kernels, written three ways: what an ONNX graph's MatMul-Softmax-MatMul
becomes, OpenVINO's own ScaledDotProductAttention operator, and either with the heads zero-padded to a wider size.

    python benchmarks/openvino_attention.py [--tokens 4096] [--heads 8] [--dim 40] [--pad 64] [--batch 2]

SD 1.5's largest attention (512x512: 4096 tokens, 8 heads of 40 channels, guided batch 2) by default. Zero-padded
query/key channels leave the scores unchanged and padded value channels are cut off again, so every variant
computes the same numbers; the script checks that against the first and prints each one's median time (--runs
interleaved calls) and the products' GFLOP/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def build(kind: str, batch: int, tokens: int, heads: int, dim: int, padded: int):
    import openvino as ov
    import openvino.opset13 as ops

    def const(values, dtype=np.int64):
        return ops.constant(np.array(values, dtype))

    params = [ops.parameter([batch, tokens, heads * dim], np.float32, name=n) for n in ("q", "k", "v")]

    def split_heads(x):
        x = ops.transpose(ops.reshape(x, const([batch, tokens, heads, dim]), False), const([0, 2, 1, 3]))
        if padded > dim:
            x = ops.pad(x, const([0, 0, 0, 0]), const([0, 0, 0, padded - dim]), "constant", ops.constant(np.float32(0)))
        return x

    q, k, v = (split_heads(p) for p in params)
    scale = ops.constant(np.float32(dim ** -0.5))
    if kind == "sdpa":
        out = ops.scaled_dot_product_attention(q, k, v, scale=scale, causal=False)
    else:
        out = ops.matmul(ops.softmax(ops.multiply(ops.matmul(q, k, False, True), scale), -1), v, False, False)
    if padded > dim:
        out = ops.slice(out, const([0, 0, 0, 0]), const([batch, heads, tokens, dim]), const([1, 1, 1, 1]))
    out = ops.reshape(ops.transpose(out, const([0, 2, 1, 3])), const([batch, tokens, heads * dim]), False)
    return ov.Model([out], params, kind)


def main() -> None:
    import openvino as ov

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=40)
    ap.add_argument("--pad", type=int, default=64, help="the padded head width of the padded variants")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    if args.pad < args.dim:
        raise SystemExit(f"--pad {args.pad} is narrower than --dim {args.dim}")
    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": args.threads}
    rng = np.random.default_rng(0)
    feed = [rng.standard_normal((args.batch, args.tokens, args.heads * args.dim), np.float32) for _ in range(3)]
    variants = {f"{kind}{'' if width == args.dim else f', heads padded to {width}'}": (kind, width)
                for width in (args.dim, args.pad) for kind in ("matmul-softmax-matmul", "sdpa")}
    requests, first = {}, None
    for name, (kind, width) in variants.items():
        compiled = core.compile_model(build(kind, args.batch, args.tokens, args.heads, args.dim, width), "CPU", config)
        requests[name] = compiled.create_infer_request()
        out = np.array(requests[name].infer(feed)[0])
        first = out if first is None else first
        print(f"{name}: max difference from the first variant {float(np.abs(out - first).max()):.3g} "
              f"(inference precision {compiled.get_property('INFERENCE_PRECISION_HINT')})")
    times = {name: [] for name in requests}
    for _ in range(args.runs):
        for name, request in requests.items():
            start = time.perf_counter()
            request.infer(feed)
            times[name].append(time.perf_counter() - start)
    flops = 4 * args.batch * args.heads * args.tokens ** 2 * args.dim  # QK^T and PV, at the unpadded width
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:45s} {1e3 * median:7.1f} ms  {flops / median / 1e9:6.0f} GFLOP/s")


if __name__ == "__main__":
    main()
