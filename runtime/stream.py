"""A graph of a folder exported with `--stream` (the U-Net, the VAE decoder) run as its chain of part graphs, each
loaded only while it runs.

Low-memory mode then holds one part's weights at a time instead of the whole graph's; the page cache keeps the
part files warm between steps, outside the process's memory. The tensors that cross a cut (skip connections,
the time embedding) are kept only until the last part that reads them has run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SdonnxError
from .session import Component, SessionConfig
from .system import trim_heap


@dataclass(frozen=True)
class Part:
    """One part graph: its file and the names of the tensors it reads and hands on."""

    path: Path
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def streamed_components(meta: dict) -> tuple[str, ...]:
    """The components a folder's sdonnx.json lists as streamed (`export --stream`)."""
    return tuple((meta.get("stream") or {}).get("components") or ())


def read_parts(root: Path, meta: dict, component: str) -> tuple[tuple[Part, ...], str]:
    """(the parts of `component` in running order, the name of the whole graph's output) from sdonnx.json."""
    try:
        entry = meta["stream"]["components"][component]
        parts = tuple(Part(root / p["file"], tuple(p["inputs"]), tuple(p["outputs"])) for p in entry["parts"])
        return parts, entry["output"]
    except (KeyError, TypeError) as err:
        raise SdonnxError(f"{root / 'sdonnx.json'}: malformed stream entry for {component} ({err!r})") from None


class Streamed:
    """A graph (named inputs -> {output: ...}) over its parts, each opened, run and closed in turn.

    chunks: the batch runs in this many pieces through each part while it is loaded (2 for a guided batch, the
    same halves low-memory mode runs the whole U-Net on), so each part is loaded once per call."""

    def __init__(self, parts: tuple[Part, ...], output: str, config: SessionConfig | None = None, chunks: int = 1):
        if not parts:
            raise SdonnxError("a streamed graph needs at least one part")
        self.parts, self.output, self.config, self.chunks = parts, output, config or SessionConfig(), chunks
        # after part i, keep only what a later part reads (and the result)
        self.keep = [set().union(*(p.inputs for p in parts[i + 1:]), {output}) for i in range(len(parts))]

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        pieces = self._split(feeds)
        for part, keep in zip(self.parts, self.keep):
            component = self._open(part)
            try:
                for values in pieces:
                    values.update(component.run_with({k: values[k] for k in part.inputs if k in feeds},
                                                     {k: values[k] for k in part.inputs if k not in feeds}))
            finally:
                component.close()
            for values in pieces:
                for name in [k for k in values if k not in keep]:
                    del values[name]
            trim_heap()
        return {self.output: np.concatenate([values[self.output] for values in pieces])}

    def _split(self, feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """The feeds in `chunks` pieces along the batch; scalars (the timestep) go to every piece."""
        batch = max(np.shape(v)[0] for v in feeds.values() if np.ndim(v) > 1)
        chunks = min(self.chunks, batch)
        split = {k: np.array_split(np.asarray(v), chunks) if np.ndim(v) and np.shape(v)[0] == batch else [v] * chunks
                 for k, v in feeds.items()}
        return [{k: parts[i] for k, parts in split.items()} for i in range(chunks)]

    def _open(self, part: Part) -> Component:
        if not part.path.is_file():
            raise SdonnxError(f"streamed part {part.path.parent.name}/{part.path.name} is missing")
        return Component(part.path, self.config)
