"""Graphs whose weights live in an external data file, handled one tensor at a time.

A full SDXL U-Net holds 10.3 GB of fp32 weights. Loading a model with `onnx.load` puts every weight into the
protobuf (and protobuf's arena keeps them until the whole message goes), so each step that loads the whole model
costs its size again; these helpers read and write the weights tensor by tensor instead, so a step holds the graph
plus one tensor."""

from __future__ import annotations

from collections import Counter

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

# onnx's writer moves a tensor out when sys.getsizeof(raw_data) reaches its threshold: a bytes object's header
# counts too, so compare the same way
_THRESHOLD = 1024


def _stays_inline(length: int) -> bool:
    return sys.getsizeof(b"") + length < _THRESHOLD


def read_bytes(tensor: onnx.TensorProto, base: Path) -> bytes:
    """The raw bytes of an initializer, inline or from its external file."""
    if not uses_external_data(tensor):
        return tensor.raw_data
    info = ExternalDataInfo(tensor)
    with open(base / info.location, "rb") as f:
        if info.offset:
            f.seek(int(info.offset))
        return f.read(int(info.length) if info.length is not None else -1)


def read_array(tensor: onnx.TensorProto, base: Path) -> np.ndarray:
    """An initializer as a NumPy array, reading only its own bytes."""
    if not uses_external_data(tensor):
        return onnx.numpy_helper.to_array(tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.frombuffer(read_bytes(tensor, base), dtype=dtype).reshape(tuple(tensor.dims))


def point(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make `tensor` read its bytes from `location` (as onnx's set_external_data, which wants them inline first)."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


class DataWriter:
    """Appends tensors to one external data file and points their protos at it (small ones stay inline)."""

    def __init__(self, path: Path, append: bool = False):
        self.path = path
        self.file = open(path, "ab" if append else "wb")

    def put(self, tensor: onnx.TensorProto, data: bytes) -> None:
        if _stays_inline(len(data)):
            _inline(tensor, data)
            return
        offset = self.file.tell()
        self.file.write(data)
        point(tensor, self.path.name, offset, len(data))

    def close(self) -> None:
        self.file.close()


def rewrite(model: onnx.ModelProto, src_base: Path, dst: Path, data_name: str, inline_below: int,
            fresh: Path | None = None, consume: bool = False) -> Path:
    """Save `model` (weights not loaded; external ones read from `src_base`) to `dst`: weights in `data_name`
    beside it when their total exceeds `inline_below` bytes, else all inside the graph file, as `onnx.save_model`
    would place them. `fresh`: a data file beside `dst` the caller already wrote some tensors to (their protos
    name it); it becomes the data file (or goes). `consume`: delete each source file once every tensor in it is
    copied (torch writes one per tensor), so the copy never needs the disk twice."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = dst.parent / data_name
    inits = list(model.graph.initializer)
    mine = {t.name for t in inits if fresh is not None and _location(t) == fresh.name}
    total = sum(_length(t, dst.parent if t.name in mine else src_base) for t in inits)
    if total <= inline_below:
        for t in inits:
            if uses_external_data(t) or t.HasField("raw_data"):
                _inline(t, read_bytes(t, dst.parent if t.name in mine else src_base))
        for path in (data, fresh):
            if path is not None and path.exists():
                path.unlink()
        onnx.save_model(model, str(dst))
        return dst
    staged = fresh if fresh is not None else dst.parent / (data_name + ".part")
    writer = DataWriter(staged, append=fresh is not None)
    # how many tensors still to copy read each source file: a file goes once all of them are copied
    readers = Counter(_location(t) for t in inits if t.name not in mine and uses_external_data(t))
    try:
        for t in inits:
            if t.name in mine:
                if _stays_inline(_length(t, dst.parent)):
                    _inline(t, read_bytes(t, dst.parent))
                continue
            if not (uses_external_data(t) or t.HasField("raw_data")):
                continue  # typed fields (float_data, int32_data): onnx keeps them inline
            source = _location(t) if uses_external_data(t) else None
            writer.put(t, read_bytes(t, src_base))
            if consume and source is not None:
                readers[source] -= 1
                if not readers[source]:  # its last tensor copied (torch writes one file per tensor)
                    (src_base / source).unlink(missing_ok=True)
    finally:
        writer.close()
    for t in inits:  # the protos name the staging file; the file takes the final name
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = data_name
    staged.replace(data)
    onnx.save_model(model, str(dst))
    return dst


def _inline(t: onnx.TensorProto, raw: bytes) -> None:
    del t.external_data[:]
    t.data_location = onnx.TensorProto.DEFAULT
    t.raw_data = raw


def _location(t: onnx.TensorProto) -> str | None:
    return ExternalDataInfo(t).location if uses_external_data(t) else None


def _length(t: onnx.TensorProto, base: Path) -> int:
    if not uses_external_data(t):
        return len(t.raw_data)
    info = ExternalDataInfo(t)
    if info.length is not None:
        return int(info.length)
    return (base / info.location).stat().st_size - int(info.offset or 0)  # torch names no length: the whole file


def gather(raw: Path, dst: Path, data_name: str, inline_below: int) -> Path:
    """torch.onnx.export's output (one file per weight when over 2 GB) -> `dst` with one data file, as
    `save_model(onnx.load(raw), dst)` writes it, without loading the weights."""
    model = onnx.load(str(raw), load_external_data=False)
    if not any(uses_external_data(t) for t in model.graph.initializer):
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(raw), str(dst))
        return dst
    return rewrite(model, raw.parent, dst, data_name, inline_below, consume=True)
