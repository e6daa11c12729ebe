"""ONNX Runtime graph optimizations that hold on every execution provider, applied offline."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort

from . import onnx as graphs


def _needs_external_data(path: Path) -> bool:
    data = path.parent / graphs.EXTERNAL_DATA_NAME
    return data.exists() or path.stat().st_size > graphs.EXTERNAL_DATA_BYTES


def optimize(src: Path, dst: Path) -> Path:
    """Save `src` after ORT's *basic* level (constant folding, redundant-node removal, standard-op fusions).

    Only the basic level runs before graph partitioning, so its result stays valid for any provider; the
    extended level would bake CPU-only contrib ops (e.g. FusedConv) into the file.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    if _needs_external_data(src):
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    graphs.EXTERNAL_DATA_NAME)
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return dst


def op_counts(path: Path) -> dict[str, int]:
    """How many nodes of each (domain-qualified) op type the graph holds, for the export report."""
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def foreign_ops(path: Path) -> list[str]:
    """Ops outside the standard ONNX domain (contrib ops some providers lack)."""
    return sorted(k for k in op_counts(path) if "." in k)
