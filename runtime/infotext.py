"""Generation parameters as AUTOMATIC1111 writes them into a picture ("infotext"), both ways.

The layout: the prompt (any number of lines), then `Negative prompt: ...` (also any number of lines) when there
is one, then one line of `Key: value` pairs joined by ", ". A value holding a comma, a colon or a line break is
written as a JSON string. A reader takes the last line as the pairs line only when at least three pairs match
there; otherwise every line is prompt. Lines are stripped, so a prompt's leading/trailing spaces per line do not
survive (CLIP's tokenizer ignores them anyway).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import a1111
from .errors import SdonnxError
from .model import VAES
from .schedulers import NAMES

if TYPE_CHECKING:
    from .pipeline import Settings

NEGATIVE = "Negative prompt:"
# A1111's grammar of one pair: a key of word characters, spaces, hyphens and slashes; a value that is either a
# JSON-style quoted string or runs up to the next comma
PAIR = re.compile(r"""
    \s* (?P<key> \w [\w \-/]+ ) : \s*
    (?P<value> "(?:\\.|[^\\"])+" | [^,]* )
    (?: , | $ )
""", re.VERBOSE)
SIZE = re.compile(r"^(\d+)x(\d+)$")
MIN_PAIRS = 3  # fewer on the last line and it is prompt text, as A1111 reads it

# ---- writing ---------------------------------------------------------------------------------------


def quote(value: object) -> str:
    """A value as A1111 writes it: JSON-quoted when it holds a comma, colon or line break (and here also a quote
    or outer spaces, which a reader would otherwise unquote or strip)."""
    text = str(value)
    if any(c in text for c in ',:\n"') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def number(x: float) -> str:
    """7.0 -> "7", 7.5 -> "7.5": A1111's usual spelling, and exact (repr) for any other float."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def pairs(settings: "Settings") -> dict[str, object]:
    """The pairs line of a Settings, in A1111's order, then our own fields (None: not written)."""
    sampler, schedule = a1111.sampler_of(settings.scheduler)
    clip_skip, syntax = settings.clip_skip, settings.prompt_syntax
    return {
        "Steps": settings.steps, "Sampler": sampler, "Schedule type": schedule,
        "CFG scale": number(settings.guidance), "Seed": settings.seed, "Size": f"{settings.width}x{settings.height}",
        "Model": settings.model,
        "Denoising strength": None if settings.strength is None else number(settings.strength),
        "Clip skip": clip_skip if clip_skip > 1 else None,
        # ours: the exact scheduler (A1111's names fold pndm into PLMS etc.), and what A1111 has no field for
        "Scheduler": settings.scheduler, "VAE": settings.vae,
        "Cache interval": settings.cache_interval if settings.cache_interval > 1 else None,
        "Prompt syntax": syntax if syntax != "a1111" else None,
    }


def format(settings: "Settings", extra: dict[str, object] | None = None) -> str:  # noqa: A001 (the API's name)
    """The infotext of one generated picture; `extra` pairs (e.g. {"Batch size": 2, "Batch pos": 0}) are
    appended, None values skipped."""
    line_pairs = {**pairs(settings), **(extra or {})}
    line = ", ".join(f"{k}: {quote(v)}" for k, v in line_pairs.items() if v is not None)
    negative = f"\n{NEGATIVE} {settings.negative_prompt}" if settings.negative_prompt else ""
    return f"{settings.prompt}{negative}\n{line}".strip()


# ---- reading ---------------------------------------------------------------------------------------


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value  # A1111 keeps a value that only looks quoted
    return value


def parse(text: str) -> dict[str, str]:
    """An infotext -> {"Prompt": ..., "Negative prompt": ..., key: value, ...}, every value a string as
    written (unquoted). Keys are A1111's, exactly as in the text; a repeated key keeps its last value."""
    *lines, last = text.strip().split("\n")
    if len(PAIR.findall(last)) < MIN_PAIRS:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] | None = None
    for line in (x.strip() for x in lines):
        if line.startswith(NEGATIVE):
            negative = negative if negative is not None else []
            line = line[len(NEGATIVE):].strip()
        (prompt if negative is None else negative).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative or [])}
    for m in PAIR.finditer(last):
        result[m.group("key")] = _unquote(m.group("value"))
    return result


def has_settings(fields: dict[str, str]) -> bool:
    """Whether a parsed infotext has a pairs line at all (a bare prompt or a preview's note has none)."""
    return len(fields) > 2


# ---- what an infotext asks for -----------------------------------------------------------------------


@dataclass
class Recipe:
    """An infotext's settings as `Pipeline` / `sdonnx generate` keyword arguments (only those it states)."""

    options: dict[str, object] = field(default_factory=dict)
    model: str | None = None  # the model's name as written: informative, never used to find a folder
    batch: tuple[int, int] | None = None  # (Batch size, Batch pos): which image of a batch this one was
    ignored: list[str] = field(default_factory=list)  # keys read but not used, in the text's order


def _typed(key: str, value: str, kind: type):
    try:
        return kind(value)
    except ValueError:
        raise SdonnxError(f"infotext field {key!r} has a bad value {value!r}") from None


def recipe(fields: dict[str, str]) -> Recipe:
    """What a parsed infotext asks for: prompt, negative_prompt, steps, guidance, scheduler, seed, width, height,
    strength, clip_skip, vae, cache_interval, prompt_syntax; A1111's sampler names mapped to ours (our own
    `Scheduler` field wins when it names one of ours). Raises SdonnxError (one line) for a sampler or value we
    cannot use."""
    out = Recipe()
    o = out.options
    o["prompt"], o["negative_prompt"] = fields.get("Prompt", ""), fields.get("Negative prompt", "")
    used = {"Prompt", "Negative prompt", "Sampler", "Schedule type"}
    simple = {"Steps": ("steps", int), "CFG scale": ("guidance", float), "Seed": ("seed", int),
              "Denoising strength": ("strength", float), "Cache interval": ("cache_interval", int)}
    for key, (name, kind) in simple.items():
        if key in fields:
            o[name] = _typed(key, fields[key], kind)
            used.add(key)
    if "Size" in fields:
        o["width"], o["height"] = _size(fields["Size"])
        used.add("Size")
    if "Clip skip" in fields and (skip := _typed("Clip skip", fields["Clip skip"], int)) != 1:
        o["clip_skip"] = skip  # absent or 1: the last layer, the default
    used.add("Clip skip")
    if fields.get("Prompt syntax", "a1111") != "a1111":
        o["prompt_syntax"] = fields["Prompt syntax"]
    used.add("Prompt syntax")
    if fields.get("VAE", "").lower() in VAES:  # A1111's VAE field names a file: not ours to use
        o["vae"] = fields["VAE"].lower()
        used.add("VAE")
    if "Model" in fields:
        out.model = fields["Model"]
        used.add("Model")
    out.batch = _batch(fields)
    if out.batch is not None:
        used |= {"Batch size", "Batch pos"}
    scheduler = _scheduler(fields)
    if scheduler is not None:
        o["scheduler"] = scheduler
    if fields.get("Scheduler") in NAMES:
        used.add("Scheduler")
    out.ignored = [k for k in fields if k not in used]
    return out


def _size(text: str) -> tuple[int, int]:
    m = SIZE.match(text)
    if m is None:
        raise SdonnxError(f"infotext field 'Size' has a bad value {text!r} (want WxH)")
    return int(m.group(1)), int(m.group(2))


def _batch(fields: dict[str, str]) -> tuple[int, int] | None:
    """(Batch size, Batch pos) of a picture made in a batch of several: our seed draws the whole batch's noise,
    so a picture is regenerated with its batch."""
    size = _typed("Batch size", fields.get("Batch size", "1"), int)
    if size < 2:
        return None
    pos = _typed("Batch pos", fields.get("Batch pos", "0"), int)
    if not 0 <= pos < size:
        raise SdonnxError(f"infotext has Batch pos {pos} outside a batch of {size}")
    return size, pos


def _scheduler(fields: dict[str, str]) -> str | None:
    ours = fields.get("Scheduler", "")
    if ours in NAMES:  # the exact one (A1111's names fold pndm into PLMS): the sampler line is then redundant
        return ours
    if "Sampler" not in fields:
        return None
    try:
        return a1111.scheduler_of(fields["Sampler"], fields.get("Schedule type"))
    except a1111.SamplerNameError as err:
        raise SdonnxError(str(err)) from None


def read_image(path: str | Path) -> str:
    """The infotext a picture carries: a PNG's `parameters` text chunk, or the EXIF UserComment A1111 writes
    into JPEG and WebP files. One-line errors for a missing or unreadable file and for a picture without one."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            text = (getattr(img, "text", None) or {}).get("parameters") or img.info.get("parameters")
            if not text:
                text = _user_comment(img.getexif())
    except FileNotFoundError:
        raise SdonnxError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise SdonnxError(f"not a readable image file: {path}") from None
    if not text or not text.strip():
        raise SdonnxError(f"{path} carries no generation parameters (no PNG 'parameters' chunk or EXIF "
                          "UserComment)")
    return text


EXIF_IFD, USER_COMMENT = 0x8769, 0x9286
CHARSETS = {b"UNICODE\0": "utf-16", b"ASCII\0\0\0": "ascii", b"\0" * 8: "utf-8"}


def _user_comment(exif) -> str | None:
    """EXIF UserComment: an 8-byte character-set code, then the text (A1111 writes UNICODE, big-endian)."""
    raw = exif.get_ifd(EXIF_IFD).get(USER_COMMENT) if exif else None
    if not isinstance(raw, bytes) or len(raw) < 8:
        return raw if isinstance(raw, str) else None
    code, body = raw[:8], raw[8:]
    charset = CHARSETS.get(code)
    if charset is None:
        return None
    if charset == "utf-16" and body[:2] not in (b"\xff\xfe", b"\xfe\xff"):
        # no byte-order mark: big-endian (A1111's), unless the first character reads as little-endian ASCII
        charset = "utf-16-le" if body[:1] != b"\0" and body[1:2] == b"\0" else "utf-16-be"
    return body.decode(charset, errors="replace").rstrip("\0")
