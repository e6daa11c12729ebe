"""The tiny model's world: captioned pictures of one filled shape on a plain background, and their judge.

Pure NumPy + Pillow, so the evaluator runs beside the torch-free runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 60, 220),
    "yellow": (240, 215, 35),
    "purple": (130, 40, 170),
    "orange": (245, 135, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.14, "large": 0.28}
MEDIUM = 0.21
POSITIONS = {
    "top left": (0.32, 0.32),
    "top right": (0.68, 0.32),
    "bottom left": (0.32, 0.68),
    "bottom right": (0.68, 0.68),
    "center": (0.5, 0.5),
}
PAD_WORDS = ("a", "an", "on", "in", "the", "background")


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    size: str | None = None       # None: medium, not named in the caption
    position: str | None = None   # None: center, not named in the caption

    def caption(self) -> str:
        words = [self.size] if self.size else []
        words += [self.color, self.shape]
        words.insert(0, "an" if words[0][0] in "aeiou" else "a")
        if self.position:
            words += ["in the", self.position]
        words += ["on", "an" if self.background[0] in "aeiou" else "a", self.background, "background"]
        return " ".join(words)

    @property
    def where(self) -> str:
        return self.position or "center"


def vocabulary() -> list[str]:
    """Every word a caption can use (for building the tokenizer)."""
    words = list(COLORS) + list(SHAPES) + list(SIZES) + list(PAD_WORDS)
    for pos in POSITIONS:
        words += pos.split()
    return sorted(set(words))


def random_scene(rng: np.random.Generator) -> Scene:
    color, background = rng.choice(list(COLORS), size=2, replace=False)
    shape = SHAPES[rng.integers(len(SHAPES))]
    size = rng.choice([None, *SIZES])
    position = rng.choice([None, *POSITIONS])
    return Scene(str(shape), str(color), str(background), size and str(size), position and str(position))


def all_scenes() -> list[Scene]:
    """Every distinct scene of the language (each renders deterministically)."""
    return [
        Scene(shape, color, background, size, position)
        for shape in SHAPES
        for color in COLORS
        for background in COLORS
        if background != color
        for size in (None, *SIZES)
        for position in (None, *POSITIONS)
    ]


def parse_caption(caption: str) -> Scene:
    """Inverse of Scene.caption for captions of this language; ValueError otherwise."""
    text = " " + caption.lower().strip() + " "
    found = lambda names: [n for n in names if f" {n} " in text]  # noqa: E731
    shapes = found(SHAPES)
    bg = [c for c in COLORS if f" {c} background" in text]
    colors = [c for c in found(COLORS) if f" {c} {shapes[0] if shapes else ''}" in text]
    if len(shapes) != 1 or len(bg) != 1 or len(colors) != 1:
        raise ValueError(f"not a caption of the shapes language: {caption!r}")
    size = (found(SIZES) or [None])[0]
    position = (found([p for p in POSITIONS if p != "center"]) or found(["center"]) or [None])[0]
    return Scene(shapes[0], colors[0], bg[0], size, position)


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw the scene, antialiased by supersampling."""
    big = size * supersample
    img = Image.new("RGB", (big, big), COLORS[scene.background])
    draw = ImageDraw.Draw(img)
    cx, cy = (v * big for v in POSITIONS[scene.where])
    r = (SIZES[scene.size] if scene.size else MEDIUM) * big
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        s = r * 0.9
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        h = r * 1.05
        draw.polygon([(cx, cy - h), (cx - h * 1.1, cy + h * 0.8), (cx + h * 1.1, cy + h * 0.8)], fill=fill)
    return img.resize((size, size), Image.LANCZOS)


def batch(rng: np.random.Generator, n: int, size: int = 64) -> tuple[np.ndarray, list[str]]:
    """n random scenes as float32 NCHW in [-1, 1] with their captions."""
    scenes = [random_scene(rng) for _ in range(n)]
    pix = np.stack([np.asarray(render(s, size), dtype=np.float32) for s in scenes])
    return pix.transpose(0, 3, 1, 2) / 127.5 - 1.0, [s.caption() for s in scenes]


def _nearest_color(rgb: np.ndarray) -> str:
    names = list(COLORS)
    dist = [np.sum((rgb - np.asarray(COLORS[n], dtype=np.float32)) ** 2) for n in names]
    return names[int(np.argmin(dist))]


@dataclass(frozen=True)
class Judgement:
    background: str
    color: str | None
    shape: str | None
    position: str | None


def judge(image: Image.Image | np.ndarray) -> Judgement:
    """Read background colour, shape colour, shape class and position off a generated picture."""
    pix = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    h, w, _ = pix.shape
    border = np.concatenate([pix[0], pix[-1], pix[:, 0], pix[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest_color(bg_rgb)
    far = np.sqrt(((pix - bg_rgb) ** 2).sum(-1)) > 60.0
    if far.sum() < 0.004 * h * w:
        return Judgement(background, None, None, None)
    fg_rgb = np.median(pix[far], axis=0)
    color = _nearest_color(fg_rgb)
    # Split antialiased edges halfway between the two colours so areas come out right.
    mask = ((pix - fg_rgb) ** 2).sum(-1) < ((pix - bg_rgb) ** 2).sum(-1)
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() / w, ys.mean() / h
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return Judgement(background, color, _classify(mask), position)


def _open(mask: np.ndarray) -> np.ndarray:
    """Morphological opening with a 3x3 square: drops stray pixels, keeps the shape's outline."""
    def shifts(m: np.ndarray):
        p = np.pad(m, 1)
        return [p[1 + dy : 1 + dy + m.shape[0], 1 + dx : 1 + dx + m.shape[1]] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]

    eroded = np.logical_and.reduce(shifts(mask))
    return np.logical_or.reduce(shifts(eroded))


def _classify(mask: np.ndarray) -> str:
    """Fill ratio of the bounding box (square ~1, circle ~pi/4, triangle ~1/2) and how much narrower the
    top quarter is than the bottom one (a triangle points up)."""
    cleaned = _open(mask)
    mask = cleaned if cleaned.any() else mask
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    quarter = max(1, box.shape[0] // 4)
    top, bottom = box[:quarter].sum(), box[-quarter:].sum()
    fill = box.mean()
    if fill > 0.9:
        return "square"
    if top < 0.5 * bottom:
        return "triangle"
    return "circle" if fill > 0.62 else "triangle"


def score(scenes: list[Scene], images: list) -> dict[str, float]:
    """Accuracies (in %) of background colour, shape colour, shape and position over paired scenes/images."""
    return accuracy(scenes, [judge(image) for image in images])


def accuracy(scenes: list[Scene], judgements: list[Judgement]) -> dict[str, float]:
    """score() over pictures already judged."""
    hits = {"background": 0, "color": 0, "shape": 0, "position": 0}
    for scene, j in zip(scenes, judgements):
        hits["background"] += j.background == scene.background
        hits["color"] += j.color == scene.color
        hits["shape"] += j.shape == scene.shape
        hits["position"] += j.position == scene.where
    return {k: 100.0 * v / max(1, len(scenes)) for k, v in hits.items()}
