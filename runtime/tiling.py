"""VAE decoding in overlapping latent tiles, blended with linear feathers so no seam shows (less peak memory)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import SdonnxError

Decode = Callable[[np.ndarray], np.ndarray]  # latents [N, C, h, w] -> pixels [N, 3, h*f, w*f]


@dataclass(frozen=True)
class Tiles:
    """Tile side and overlap in latent pixels (x8 in image pixels for SD's VAE)."""

    size: int = 40
    overlap: int = 16

    def __post_init__(self) -> None:
        if self.size < 2 or not 0 <= self.overlap < self.size:
            raise SdonnxError(f"tiles need size >= 2 and 0 <= overlap < size, got size {self.size}, "
                              f"overlap {self.overlap}")

    def starts(self, length: int) -> list[int]:
        """Tile offsets along one axis: a stride of size - overlap, the last tile flush with the end."""
        if length <= self.size:
            return [0]
        stride = self.size - self.overlap
        starts = list(range(0, length - self.size, stride))
        return starts + [length - self.size]

    def needed(self, height: int, width: int) -> bool:
        return height > self.size or width > self.size


def feather(length: int, ramp: int, lead: bool, trail: bool) -> np.ndarray:
    """1-D weights: a linear rise over `ramp` samples at an edge that meets another tile, 1 elsewhere.

    Weights stay above 0, so every pixel has weight; the blend divides by their sum."""
    w = np.ones(length, np.float32)
    ramp = min(ramp, length)
    if ramp > 0:
        rise = (np.arange(ramp, dtype=np.float32) + 0.5) / ramp
        if lead:
            w[:ramp] = np.minimum(w[:ramp], rise)
        if trail:
            w[length - ramp:] = np.minimum(w[length - ramp:], rise[::-1])
    return w


def decode_tiled(decode: Decode, latents: np.ndarray, tiles: Tiles, scale: int) -> np.ndarray:
    """Decode `latents` tile by tile; `scale` is the VAE's upsampling factor. One tile: plain decoding."""
    h, w = latents.shape[-2:]
    if not tiles.needed(h, w):
        return decode(latents)
    rows, cols = tiles.starts(h), tiles.starts(w)
    out = weight = None
    for y in rows:
        for x in cols:
            part = decode(np.ascontiguousarray(latents[..., y:y + tiles.size, x:x + tiles.size]))
            if out is None:
                out = np.zeros(part.shape[:2] + (h * scale, w * scale), np.float32)
                weight = np.zeros((h * scale, w * scale), np.float32)
            ph, pw = part.shape[-2:]
            wy = feather(ph, tiles.overlap * scale, lead=y > 0, trail=y + tiles.size < h)
            wx = feather(pw, tiles.overlap * scale, lead=x > 0, trail=x + tiles.size < w)
            mask = wy[:, None] * wx[None, :]
            ys, xs = slice(y * scale, y * scale + ph), slice(x * scale, x * scale + pw)
            out[..., ys, xs] += part * mask
            weight[ys, xs] += mask
    return out / weight
