"""SDXL's conditioning (Podell et al. 2023): two text encoders read at their penultimate layer and joined, the
second one's pooled projection, and the six size/crop numbers (`time_ids`) its U-Net takes beside them.

As AUTOMATIC1111 does for SDXL, each encoder runs on each 75-token chunk and its chunk outputs carry the prompt
weights (text_encoding.emphasis); the pooled embedding is the second encoder's for the first chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import SdonnxError
from .prompt_chunks import Chunks
from .text_encoding import encode_with, hidden_layers

POOLED = "text_embeds"  # the second encoder's projected pooled output (optimum's name)


@dataclass(frozen=True)
class Text:
    """One prompt's SDXL encoding: hidden [1, 77 * chunks, D1 + D2] and pooled [1, P]."""

    hidden: np.ndarray
    pooled: np.ndarray

    def zeros(self) -> "Text":
        """What an empty negative prompt conditions on when the model forces zeros for it."""
        return Text(np.zeros_like(self.hidden), np.zeros_like(self.pooled))


def hidden_output(encoder, clip_skip: int) -> str:
    """The `hidden_states.K` output clip skip N reads: the (N + 1)-th from the end, as diffusers' SDXL pipeline
    reads hidden_states[-(clip_skip + 2)] with its clip_skip = N - 1 (no final layer norm: SDXL's own reading)."""
    states = hidden_layers(encoder.outputs)  # the embeddings' output and one per layer
    name = encoder.path.parent.name
    if states < 3:
        raise SdonnxError(f"{name}/model.onnx has no layer outputs (hidden_states.K), which SDXL reads: "
                          "export it with them (optimum and sdonnx export both do)")
    if clip_skip > states - 2:
        raise SdonnxError(f"clip skip {clip_skip} is more than SDXL's {name} allows ({states - 2}: it reads "
                          f"the layer before the last at clip skip 1)")
    return f"hidden_states.{states - 1 - clip_skip}"


def run_encoder(encoder, chunks: Chunks, clip_skip: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
    """One encoder (a text_encoder or text_encoder_2 Component) on its tokenizer's chunks of one prompt:
    (weighted hidden states [1, 77 * chunks, D], the first chunk's pooled output where the encoder has one)."""
    return encode_with(encoder, chunks, hidden_output(encoder, clip_skip), first_of=POOLED)


def join(first: tuple[np.ndarray, np.ndarray | None], second: tuple[np.ndarray, np.ndarray | None]) -> Text:
    """The two encoders' run_encoder results as SDXL's conditioning: hidden states side by side, the second's
    pooled output."""
    if second[1] is None:
        raise SdonnxError(f"text_encoder_2/model.onnx has no {POOLED} output (the projected pooled embedding "
                          "SDXL's U-Net takes)")
    return Text(np.concatenate([first[0], second[0]], axis=-1).astype(np.float32), second[1].astype(np.float32))


def time_ids(height: int, width: int, batch: int) -> np.ndarray:
    """[batch, 6]: original size, crop top-left, target size, as diffusers fills them by default for an image of
    height x width (the same for the negative prompt)."""
    row = np.array([height, width, 0, 0, height, width], dtype=np.float32)
    return np.repeat(row[None], batch, axis=0)


def unet_inputs(texts: list[Text], images: int, height: int, width: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(encoder_hidden_states, the extra U-Net inputs) for `images` per prompt: texts [cond] without guidance,
    [uncond, cond] with it, each repeated along the batch in that order."""
    context = np.concatenate([np.repeat(t.hidden, images, axis=0) for t in texts])
    pooled = np.concatenate([np.repeat(t.pooled, images, axis=0) for t in texts])
    return context, {"text_embeds": pooled, "time_ids": time_ids(height, width, len(pooled))}
