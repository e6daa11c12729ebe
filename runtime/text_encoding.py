"""Prompt chunks -> the U-Net's text conditioning: each chunk encoded on its own, weighted, then concatenated.

Weights act as AUTOMATIC1111's emphasis does: each token's hidden state is multiplied by its weight, then the
whole chunk is rescaled so that its mean is what it was before. Clip skip N (A1111's meaning, 1 = the last layer)
takes the hidden state of the N-th layer from the end through the encoder's final layer norm; folders exported by
sdonnx carry every layer's output (`hidden_states.K`, optimum's names) and that norm's weights for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import SdonnxError
from .prompt_chunks import Chunks

FINAL_NORM_FILE = "final_layer_norm.npz"  # text_encoder/: weight, bias, eps of the encoder's final LayerNorm


def emphasis(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """hidden [1, T, D] scaled per token by weights [T], then by old mean / new mean; unchanged when all are 1."""
    if np.all(weights == 1.0):
        return hidden
    before = hidden.mean(dtype=np.float32)
    scaled = hidden * weights.astype(np.float32)[None, :, None]
    return (scaled * (before / scaled.mean(dtype=np.float32))).astype(np.float32)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis, in float32 as the graph computes it."""
    mean = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mean).mean(axis=-1, keepdims=True)
    return ((x - mean) / np.sqrt(var + np.float32(eps)) * weight + bias).astype(np.float32)


class FinalNorm:
    """The text encoder's final LayerNorm, read from FINAL_NORM_FILE."""

    def __init__(self, path: Path):
        try:
            with np.load(path) as data:
                self.weight = data["weight"].astype(np.float32)
                self.bias = data["bias"].astype(np.float32)
                self.eps = float(data["eps"])
        except (OSError, KeyError, ValueError) as err:
            raise SdonnxError(f"cannot read {path}: {err}") from None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return layer_norm(x, self.weight, self.bias, self.eps)


def hidden_layers(outputs: list[str]) -> int:
    """How many `hidden_states.K` outputs a text-encoder graph has (0: no clip skip beyond 1)."""
    return sum(1 for name in outputs if name.startswith("hidden_states."))


def clip_skip_reader(encoder, clip_skip: int) -> tuple[str, FinalNorm | None]:
    """(the graph output clip skip N reads, the norm to put it through): last_hidden_state as it is for 1, else
    hidden_states.(layers - N + 1) through the final layer norm."""
    if clip_skip == 1:
        return "last_hidden_state", None
    folder = Path(encoder.path).parent
    states = hidden_layers(encoder.outputs)  # the embeddings' output and one per layer
    if states == 0 or not (folder / FINAL_NORM_FILE).is_file():
        raise SdonnxError(f"clip skip {clip_skip} needs a text encoder exported with its layers' outputs, which "
                          f"{folder.parent.name} lacks: re-export it with `sdonnx export`")
    if clip_skip > states - 1:
        raise SdonnxError(f"clip skip {clip_skip} is more than this text encoder's {states - 1} layers")
    return f"hidden_states.{states - clip_skip}", FinalNorm(folder / FINAL_NORM_FILE)


def encode(encoder, chunks: Chunks, output: str = "last_hidden_state", final_norm: FinalNorm | None = None
           ) -> np.ndarray:
    """[1, chunks * max_length, D]: `encoder` (a text-encoder Component) run on each chunk, its `output` taken
    (through `final_norm` for clip skip), weighted, and the chunks joined along the sequence."""
    return encode_with(encoder, chunks, output, final_norm)[0]


def encode_with(encoder, chunks: Chunks, output: str = "last_hidden_state", final_norm: FinalNorm | None = None,
                first_of: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(encode's result, the first chunk's `first_of` output, None where the graph has none): the one chunk loop,
    which SDXL's encoders also run for their pooled output."""
    parts, first = [], None
    for i, (ids, weights) in enumerate(zip(chunks.ids, chunks.weights)):
        out = encoder(input_ids=ids[None])
        if i == 0 and first_of is not None:
            first = out.get(first_of)
        hidden = out[output]
        if final_norm is not None:
            hidden = final_norm(hidden)
        parts.append(emphasis(hidden, weights))
    return (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)), first
