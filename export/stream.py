"""The U-Net and the VAE decoder as chains of part graphs (`export --stream`), cut from the folder's own graphs.

Cutting the final (quantized) graph, rather than exporting blocks from PyTorch, keeps every weight and every op
of the whole graph: the chained parts compute what the whole graph computes. Each part holds a run of
consecutive layers (a resnet, a transformer, a down/upsampler) up to a weight budget, with its weights in its own
data file, so the low-memory runtime can hold one part at a time; the tensors that cross a cut (the skip
connections, the time embedding, the running sample) are the parts' inputs and outputs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

STREAMED = ("unet", "vae_decoder")  # the graphs --stream cuts; each into <name>_stream/
PART_BUDGET = 48 * 2**20  # weight bytes a part may reach by merging whole layers (one layer may exceed it)
# a U-Net layer in node or weight names (`/unet/down_blocks.1/attentions.0/...`, `unet.mid_block.resnets.1.conv1`)
LAYER = re.compile(r"(down_blocks|up_blocks)[./](\d+)[./](resnets|attentions|downsamplers|upsamplers)[./](\d+)"
                   r"|(mid_block)[./](resnets|attentions)[./](\d+)")
MAX_ERR = 1e-4  # the chained parts run the whole graph's ops on its weights: only float noise may differ
METHOD = ("the folder's graph cut into runs of consecutive layers (same weights, same ops), each part's weights "
          "in its own file, ORT extended optimizations applied at export")


def layer_of(name: str) -> str | None:
    """The U-Net layer a node or weight name belongs to, e.g. `down_blocks.1/attentions.0`; None outside layers."""
    m = LAYER.search(name)
    if m is None:
        return None
    if m.group(5):
        return f"mid_block/{m.group(6)}.{m.group(7)}"
    return f"{m.group(1)}.{m.group(2)}/{m.group(3)}.{m.group(4)}"


def _consumers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    uses: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            uses.setdefault(name, []).append(i)
    return uses


def _layer_order(graph: onnx.GraphProto, sample: str) -> list[str]:
    """Layers in the order the running sample passes them: by the first node of each that reads from `sample`
    (through data, not through its shape: the time embedding is broadcast to the batch size).

    (Nodes that read only weights, the text or the time embedding may be listed anywhere: the quantizer and ORT
    hoist them.)"""
    reached, order = {sample}, []
    for node in graph.node:
        if node.op_type != "Shape" and any(i in reached for i in node.input):  # not via the batch size
            reached.update(node.output)
            layer = layer_of(node.name)
            if layer is not None and layer not in order:
                order.append(layer)
    return order


def _node_bytes(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> int:
    return sum(_tensor_bytes(inits[i]) for i in node.input if i in inits)


def _tensor_bytes(t: onnx.TensorProto) -> int:
    shape = [int(d) for d in t.dims]
    return int(np.prod(shape, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def assign_parts(graph: onnx.GraphProto, budget: int = PART_BUDGET) -> list[int]:
    """The part index of each node (graph order): consecutive layers merged up to `budget` weight bytes.

    A node outside any layer goes with its earliest reader (the time embedding and conv_in with the first layer,
    the output convolution with the last); then every node moves at least as late as its inputs' producers, so
    each part reads only graph inputs and earlier parts' outputs."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise ValueError("cannot cut a graph with subgraphs (If/Loop): their outer-scope reads are not node inputs")
    sample = graph.input[0].name
    order = _layer_order(graph, sample)
    if not order:
        raise ValueError("no layers (down_blocks/mid_block/up_blocks) found in the graph's node names")
    inits = {t.name: t for t in graph.initializer}
    sizes = {layer: 0 for layer in order}
    for node in graph.node:
        layer = layer_of(node.name)
        if layer in sizes:
            sizes[layer] += _node_bytes(node, inits)
    part_of_layer, part, used = {}, 0, 0
    for layer in order:
        if used and used + sizes[layer] > budget:
            part, used = part + 1, 0
        part_of_layer[layer] = part
        used += sizes[layer]
    last = part
    nodes = list(graph.node)
    constant = _constant_nodes(graph)
    # a node computed from weights alone (an int8 weight's DequantizeLinear) goes with its reader, never ahead
    wanted: list[int | None] = [None if c else part_of_layer.get(layer_of(n.name)) for n, c in zip(nodes, constant)]
    uses = _consumers(graph)
    for i in range(len(nodes) - 1, -1, -1):  # outside layers: with the earliest reader
        if wanted[i] is None:
            readers = [wanted[j] for o in nodes[i].output for j in uses.get(o, []) if wanted[j] is not None]
            wanted[i] = min(readers) if readers else last
    producer: dict[str, int] = {}
    parts = []
    for node, want in zip(nodes, wanted):
        p = max([want] + [producer[i] for i in node.input if i in producer])
        parts.append(p)
        for o in node.output:
            producer[o] = p
    return parts


def _constant_nodes(graph: onnx.GraphProto) -> list[bool]:
    """Whether each node reads only weights (initializers) and other such nodes' outputs."""
    known = {t.name for t in graph.initializer} | {""}
    flags = []
    for node in graph.node:
        flag = all(i in known for i in node.input)
        if flag:
            known.update(node.output)
        flags.append(flag)
    return flags


def cut(model: onnx.ModelProto, parts: list[int]) -> list[onnx.ModelProto]:
    """One model per part index: its nodes, the weights they read, and as inputs/outputs the tensors that cross."""
    graph = model.graph
    n = max(parts) + 1
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name: i for i in graph.input}
    graph_outputs = {o.name for o in graph.output}
    made_in = {o: p for node, p in zip(graph.node, parts) for o in node.output}
    read_by: dict[str, set[int]] = {}
    for node, p in zip(graph.node, parts):
        for name in node.input:
            if name:
                read_by.setdefault(name, set()).add(p)
    infos = _value_infos(model)
    models = []
    for p in range(n):
        nodes = [node for node, q in zip(graph.node, parts) if q == p]
        reads = {i for node in nodes for i in node.input if i}
        inputs = [name for name in _ordered(reads, graph_inputs) if name not in inits
                  and (name in graph_inputs or made_in.get(name, p) < p)]
        outputs = sorted(name for node in nodes for name in node.output
                         if name in graph_outputs or any(q > p for q in read_by.get(name, ())))
        weights = [inits[name] for name in sorted(reads) if name in inits]
        g = onnx.helper.make_graph(nodes, f"part_{p:02d}", [_info(name, graph_inputs, infos) for name in inputs],
                                   [_info(name, {}, infos) for name in outputs], weights)
        part = onnx.helper.make_model(g, opset_imports=model.opset_import, producer_name="sdonnx stream")
        part.ir_version = model.ir_version
        models.append(part)
    return [m for m in models if len(m.graph.node)]


def _ordered(names: set[str], graph_inputs: dict) -> list[str]:
    """Graph inputs in the graph's order first, then cut tensors by name (a stable order for the files)."""
    first = [name for name in graph_inputs if name in names]
    return first + sorted(name for name in names if name not in graph_inputs)


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Types (and shapes where known) of every tensor, from ONNX shape inference on the graph without weights."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for t in skeleton.graph.initializer:  # inference needs only the weights' types and shapes
        t.ClearField("raw_data")
        t.ClearField("data_location")
        del t.external_data[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
    except Exception:  # inference refused the graph: every cut tensor gets _info's fallback
        inferred = skeleton
    return {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)}


def _info(name: str, graph_inputs: dict, infos: dict) -> onnx.ValueInfoProto:
    """A cut tensor's declaration; one ONNX could not infer (behind an op it has no schema for) is declared float
    of unknown shape: the runtime feeds cut tensors as they come, and a wrong type fails the export's check."""
    if name in graph_inputs:
        return graph_inputs[name]
    if name in infos:
        return infos[name]
    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)


def write_parts(graph: Path, out_dir: Path, budget: int = PART_BUDGET) -> list[dict]:
    """Cut `graph` into out_dir/part_NN.onnx (+ part_NN.onnx_data), each saved after ORT's extended optimizations
    so that loading it costs no graph rewriting; returns the parts' entries for sdonnx.json."""
    model = onnx.load(str(graph))
    parts = cut(model, assign_parts(model.graph, budget))
    del model
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / "_raw"
    entries = []
    try:
        for i, part in enumerate(parts):
            name = f"part_{i:02d}.onnx"
            raw = scratch / name
            raw.parent.mkdir(parents=True, exist_ok=True)
            onnx.save_model(part, str(raw), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=name + "_data", size_threshold=1024)
            _optimize(raw, out_dir / name)
            entries.append({"file": f"{out_dir.name}/{name}", "inputs": [v.name for v in part.graph.input],
                            "outputs": [v.name for v in part.graph.output],
                            "weight_mb": round(sum(_tensor_bytes(t) for t in part.graph.initializer) / 2**20, 1)})
            shutil.rmtree(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return entries


def _optimize(src: Path, dst: Path) -> None:
    """ORT's extended level (fusions into CPU contrib ops, no hardware-specific layouts), saved with external data."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + "_data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])


def externalize(path: Path) -> None:
    """Move a graph's weights into model.onnx_data beside it: ORT maps such a file instead of copying the weights
    out of the parsed graph, so loading peaks at the weights actually touched (SD 1.5's int8 text encoder: 150 MB
    instead of 434 MB, its token table being read only at the prompt's rows)."""
    from .onnx import EXTERNAL_DATA_NAME

    if (path.parent / EXTERNAL_DATA_NAME).exists():
        return
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA_NAME, size_threshold=1024)


def run_chain(entries: list[dict], root: Path, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    """The parts run one after another on `feeds` (the whole graph's inputs); returns `output` (the export's
    check)."""
    values = dict(feeds)
    for entry in entries:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        session = ort.InferenceSession(str(root / entry["file"]), so, providers=["CPUExecutionProvider"])
        out = session.run(entry["outputs"], {k: values[k] for k in entry["inputs"]})
        values.update(zip(entry["outputs"], out))
    return values[output]
