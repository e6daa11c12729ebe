"""Images over HTTP: base64 PNGs that carry their generation parameters, and base64 images read back."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from ..errors import SdonnxError
from ..infotext import format as infotext_format
from ..pipeline import Settings


def infotext(settings: Settings) -> str:
    """The parameters text every served PNG carries and `info` reports (the one place that formats it)."""
    return infotext_format(settings)


def png_base64(image: Image.Image, text: str | None) -> str:
    """A PNG with a `parameters` text chunk, base64-encoded."""
    info = PngImagePlugin.PngInfo()
    if text:
        info.add_text("parameters", text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


MAX_INPUT_PIXELS = 4096 * 4096  # an input picture (it is resized to the request's size anyway)


def image_from_base64(data: str, what: str = "image", mode: str = "RGB") -> Image.Image:
    """A PIL image from base64 text, with or without a `data:image/...;base64,` prefix; one-line errors."""
    if not isinstance(data, str) or not data.strip():
        raise SdonnxError(f"{what}: expected a base64-encoded image")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SdonnxError(f"{what}: invalid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > MAX_INPUT_PIXELS:  # checked before decoding the pixels
                raise SdonnxError(f"{what}: {img.width}x{img.height} is over {MAX_INPUT_PIXELS} pixels")
            return img.convert(mode)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise SdonnxError(f"{what}: the base64 data is not an image") from None
