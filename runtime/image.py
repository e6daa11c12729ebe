"""Images in and out: PIL <-> NumPy NCHW arrays, input sizing, inpainting masks, PNGs with their parameters."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import SdonnxError

if TYPE_CHECKING:
    from .pipeline import Settings

Params = Union["Settings", str, dict]

MULTIPLE = 8


def load_image(source: str | Path | Image.Image, mode: str = "RGB") -> Image.Image:
    """A PIL image from a path or an image; a one-line error for anything that is not an image."""
    if isinstance(source, Image.Image):
        return source.convert(mode)
    try:
        with Image.open(source) as img:
            return img.convert(mode)
    except FileNotFoundError as err:
        raise SdonnxError(f"image file not found: {source}") from err
    except (UnidentifiedImageError, OSError) as err:
        raise SdonnxError(f"not an image file: {source}") from err


def check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0 or width % MULTIPLE or height % MULTIPLE:
        raise SdonnxError(f"width and height must be positive multiples of {MULTIPLE}, got {width}x{height}")


def fit(image: Image.Image, width: int | None = None, height: int | None = None,
        resample: int = Image.Resampling.LANCZOS) -> Image.Image:
    """Resize to the requested size, or crop (centred) down to the nearest multiple of 8 when none is given."""
    if width is None and height is None:
        w, h = image.width - image.width % MULTIPLE, image.height - image.height % MULTIPLE
        if w == 0 or h == 0:
            raise SdonnxError(f"image of {image.width}x{image.height} is smaller than {MULTIPLE}x{MULTIPLE}")
        left, top = (image.width - w) // 2, (image.height - h) // 2
        return image if (w, h) == image.size else image.crop((left, top, left + w, top + h))
    width, height = width or image.width, height or image.height
    check_size(width, height)
    return image if (width, height) == image.size else image.resize((width, height), resample)


def to_array(image: Image.Image) -> np.ndarray:
    """RGB image -> float32 (1, 3, H, W) in [-1, 1], the VAE encoder's range."""
    x = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return (x.transpose(2, 0, 1)[None] * 2.0 - 1.0).astype(np.float32)


def to_unit(image: Image.Image) -> np.ndarray:
    """RGB image -> float32 (H, W, 3) in [0, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def decoded_to_unit(sample: np.ndarray) -> np.ndarray:
    """VAE decoder output (N, 3, H, W) in [-1, 1] -> (N, H, W, 3) in [0, 1]."""
    return np.clip(sample / 2.0 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(N, H, W, 3) in [0, 1] -> PIL images."""
    return [Image.fromarray(x) for x in (images * 255.0).round().astype(np.uint8)]


def load_mask(source: str | Path | Image.Image, image: Image.Image) -> Image.Image:
    """The mask as an L image, which must be the size of the image it goes with (white = repaint)."""
    mask = load_image(source, "L")
    if mask.size != image.size:
        raise SdonnxError(f"mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}")
    return mask


def mask_array(mask: Image.Image) -> np.ndarray:
    """L image -> float32 (1, 1, H, W) of 0/1: values from half-grey up are repainted, as diffusers binarises."""
    m = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return (m >= 0.5).astype(np.float32)[None, None]


def shrink_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour downsampling to latent size (source index floor(i * in / out), as torch's 'nearest')."""
    rows = (np.arange(height) * mask.shape[-2]) // height
    cols = (np.arange(width) * mask.shape[-1]) // width
    return mask[..., rows[:, None], cols[None, :]]


def parameters_text(params: Params) -> str:
    """The generation parameters as one readable block (prompt, negative prompt, then key: value pairs): for a
    pipeline's Settings, AUTOMATIC1111's infotext (sdonnx.infotext); a string as it is; a dict's keys
    capitalised in its order."""
    if isinstance(params, str):
        return params
    if not isinstance(params, dict):
        from . import infotext

        return infotext.format(params)
    lines = [str(params.get("prompt", ""))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    rest = {k: v for k, v in params.items() if k not in ("prompt", "negative_prompt") and v is not None}
    lines.append(", ".join(f"{k.replace('_', ' ').capitalize()}: {v}" for k, v in rest.items()))
    return "\n".join(lines)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_png(image: Image.Image, path: str | Path, params: Params | None = None) -> Path:
    """Write a PNG with a `parameters` text chunk (from a Settings, an infotext string or a dict: see
    parameters_text), atomically: a failed write leaves no partial file."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    if params:
        info.add_text("parameters", parameters_text(params))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sdonnx-", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; a saved picture is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
