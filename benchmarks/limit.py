"""The fastest possible U-Net call on this machine: its FLOPs over the measured matrix-multiply peak.

FLOPs are counted once with torch.utils.flop_counter on our U-Net (built on the meta device, so no weights are
allocated); the peak is the best of several large ORT MatMul (fp32) and MatMulInteger (u8 x s8 -> int32)
products (512 to 2048 square, best of 9 each), one thread per physical core as our sessions use. Where the
openvino package is installed, the same products on OpenVINO's kernels too: a float MatMul at its default
inference precision (bf16 on a CPU with AVX512-BF16 or AMX) and a QDQ MatMul it runs as int8, for the bound of the
systems on its kernels.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

CONV_OPS = ("convolution",)  # what dynamic int8 leaves in fp32 (it quantizes MatMul/Gemm only)
LINEAR_OPS = ("addmm", "mm")  # linear layers (with and without a bias)
ATTENTION_OPS = ("bmm", "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_cudnn_attention")  # the attention's two products: float in every int8 scheme


def unet_flops(weights: Path, sizes: list[int], batches: tuple[int, ...] = (1, 2)) -> dict:
    """{"<size>x<batch>": {"total": flops, "conv": ..., "matmul": ...}} for one U-Net call."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sdonnx.export.models.config import UNetConfig
    from sdonnx.export.models.unet import UNet2DConditionModel

    cfg = UNetConfig.from_dict(json.loads((weights / "unet" / "config.json").read_text()))
    vae = json.loads((weights / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    with torch.device("meta"):
        unet = UNet2DConditionModel(cfg).eval()
    out = {}
    for size in sizes:
        for batch in batches:
            lat = size // factor
            with torch.device("meta"):
                x = torch.empty(batch, cfg.in_channels, lat, lat)
                ctx = torch.empty(batch, 77, cfg.cross_attention_dim)
                t = torch.tensor(500.0)
                # an LCM U-Net's guidance input (a [batch, 256] projection: a negligible share of the FLOPs)
                cond = torch.empty(batch, cfg.time_cond_proj_dim) if cfg.is_lcm else None
                # SDXL's pooled text and size conditioning (its addition embedding: also negligible)
                added = dict(text_embeds=torch.empty(batch, cfg.text_embeds_dim),
                             time_ids=torch.empty(batch, 6)) if cfg.is_sdxl else {}
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                unet(x, t, ctx, cond, **added)
            counts = counter.get_flop_counts()
            by_op = {str(k).split(".")[-1]: int(v) for k, v in counts["Global"].items()}
            conv = sum(v for k, v in by_op.items() if k in CONV_OPS)
            total = int(counter.get_total_flops())
            kept_conv = _qdq_float_conv(unet, counts)
            attention = sum(v for k, v in by_op.items() if k in ATTENTION_OPS)
            out[f"{size}x{batch}"] = {"total": total, "conv": conv, "matmul": total - conv, "by_op": by_op,
                                      "conv_kept_float_by_qdq": kept_conv, "attention": attention,
                                      "float_by_openvino_scheme": kept_conv + attention
                                      + _openvino_float_linear(unet, counts)}
    return out


def _openvino_float_linear(unet, counts: dict) -> int:
    """Linear-layer FLOPs the `openvino` int8 scheme leaves float (quantize.INT8_FLOAT_LINEAR, INT8_KEEP_NODES)."""
    import torch

    from sdonnx.export.quantize import INT8_FLOAT_LINEAR, INT8_KEEP_NODES

    return _flops_of(unet, counts, torch.nn.Linear, LINEAR_OPS,
                     lambda path: bool(INT8_FLOAT_LINEAR.search(path) or INT8_KEEP_NODES.search(path)))


def _qdq_float_conv(unet, counts: dict) -> int:
    """Convolution FLOPs of the convolutions `--int8-scheme qdq` leaves float (quantize.qdq_keeps_float)."""
    import torch

    from sdonnx.export.quantize import qdq_keeps_float

    return _flops_of(unet, counts, torch.nn.Conv2d, CONV_OPS, qdq_keeps_float)


def _flops_of(unet, counts: dict, kind: type, ops: tuple[str, ...], kept: Callable[[str], bool]) -> int:
    """FLOPs (of `ops`) of the modules of `kind` whose path, written as the graph names it, `kept` accepts; the
    counter lists modules as `<class>.<path>`."""
    names = {f"{type(unet).__name__}.{name}" for name, m in unet.named_modules()
             if isinstance(m, kind) and kept("/" + name.replace(".", "/") + "/")}
    return sum(int(v) for name in names for op, v in counts.get(name, {}).items() if str(op).split(".")[-1] in ops)


def _matmul_model(n: int, integer: bool):
    from onnx import TensorProto, helper

    a_type, b_type, y_type = ((TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32) if integer else
                              (TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT))
    node = helper.make_node("MatMulInteger" if integer else "MatMul", ["A", "B"], ["Y"])
    graph = helper.make_graph([node], "mm", [helper.make_tensor_value_info("A", a_type, [n, n]),
                                             helper.make_tensor_value_info("B", b_type, [n, n])],
                              [helper.make_tensor_value_info("Y", y_type, [n, n])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def matmul_peak(sizes: tuple[int, ...] = (512, 1024, 2048), runs: int = 9) -> dict:
    """Best observed ops/s of n x n x n products: ORT fp32, ORT u8s8 int8, and numpy fp32 for reference."""
    import onnxruntime as ort

    from sdonnx.system import physical_cores

    so = ort.SessionOptions()
    so.intra_op_num_threads = physical_cores()
    rng = np.random.default_rng(0)
    peak = {"fp32": 0.0, "int8": 0.0, "numpy_fp32": 0.0}
    for n in sizes:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        qa = rng.integers(0, 255, (n, n), dtype=np.uint8)
        qb = rng.integers(-127, 127, (n, n), dtype=np.int8)
        for name, integer, feeds in (("fp32", False, {"A": a, "B": b}), ("int8", True, {"A": qa, "B": qb})):
            sess = ort.InferenceSession(_matmul_model(n, integer), so, providers=["CPUExecutionProvider"])
            peak[name] = max(peak[name], 2 * n**3 / _best(lambda: sess.run(None, feeds), runs))
        peak["numpy_fp32"] = max(peak["numpy_fp32"], 2 * n**3 / _best(lambda: a @ b, runs))
    return {**{k: float(v) for k, v in peak.items()}, **openvino_peak(sizes, runs)}


def openvino_peak(sizes: tuple[int, ...] = (512, 1024, 2048), runs: int = 9) -> dict:
    """Best observed ops/s of n x n x n products on OpenVINO's CPU kernels, one thread per physical core: a float
    MatMul at its default precision ("openvino_default") and one whose input is quantized to uint8 and weights to
    int8 ("openvino_int8"); {} without the openvino package."""
    try:
        import openvino as ov
    except ImportError:
        return {}
    from sdonnx.system import physical_cores

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": physical_cores()}
    rng = np.random.default_rng(0)
    peak = {"openvino_default": 0.0, "openvino_int8": 0.0}
    for n in sizes:
        a = rng.standard_normal((n, n), dtype=np.float32)
        for name, integer in (("openvino_default", False), ("openvino_int8", True)):
            request = core.compile_model(core.read_model(_weights_matmul_model(n, integer), b""), "CPU",
                                         config).create_infer_request()
            peak[name] = max(peak[name], 2 * n**3 / _best(lambda: request.infer({0: a}), runs))
    return peak


def _weights_matmul_model(n: int, integer: bool) -> bytes:
    """A [n, n] input times constant [n, n] weights, as a linear layer: float, or QDQ (OpenVINO runs it as int8)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    if integer:
        inits = [numpy_helper.from_array(rng.integers(-127, 127, (n, n), dtype=np.int8), "Wq"),
                 numpy_helper.from_array(np.array(0.01, np.float32), "w_scale"),
                 numpy_helper.from_array(np.array(0.02, np.float32), "a_scale"),
                 numpy_helper.from_array(np.array(128, np.uint8), "a_zero")]
        nodes = [helper.make_node("QuantizeLinear", ["A", "a_scale", "a_zero"], ["Aq"]),
                 helper.make_node("DequantizeLinear", ["Aq", "a_scale", "a_zero"], ["Ad"]),
                 helper.make_node("DequantizeLinear", ["Wq", "w_scale"], ["W"]),
                 helper.make_node("MatMul", ["Ad", "W"], ["Y"])]
    else:
        inits = [numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "W")]
        nodes = [helper.make_node("MatMul", ["A", "W"], ["Y"])]
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _best(fn, runs: int) -> float:
    fn()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def machine() -> dict:
    """sdonnx bench's machine facts, plus the SIMD flags that matter for these kernels, memory, peer versions."""
    from importlib.metadata import version

    from sdonnx import system

    info = dict(system.machine(), platform=platform.platform())
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = set(next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")))
        info["flags"] = sorted(f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni",
                                                          "avx512_bf16", "amx_int8", "amx_bf16", "avx512_fp16"))
        mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        info["memory_gb"] = round(int(mem.split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    for lib in ("torch", "diffusers", "transformers", "optimum", "onnx"):
        try:
            info[lib] = version("optimum-onnx" if lib == "optimum" else lib)
        except Exception:  # not installed: say so rather than fail the run
            info[lib] = None
    return info


if __name__ == "__main__":
    if sys.argv[1] == "--peak-only":
        print(json.dumps(matmul_peak()))
    else:
        weights, sizes = Path(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")]
        print(json.dumps({"machine": machine(), "matmul_peak": matmul_peak(), "unet_flops": unet_flops(weights, sizes)}))
