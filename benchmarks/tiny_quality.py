"""Quality of the bundled tiny model, judged by the shapes evaluator on fresh captions.

    python benchmarks/tiny_quality.py [--model DIR] [--int8 DIR ...] [--cache-interval K] [--guidance G ...]
                                      [--n 200] [--seed 2026] [--name tiny_quality] [--no-grid]

Reports background colour, shape colour, shape and position accuracy (%) at the folder's default
settings, at guidance 1 (no guidance), at any other `--guidance`, with the step cache, given int8 folders
for each, and with `--vae-ceiling` for the true renders through the VAE and back (what a perfect U-Net would
score); writes benchmarks/results/<name>.{json,md} (default tiny_quality) and a captioned grid PNG.
"""

from __future__ import annotations

import json
import platform
import sys
import textwrap
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageDraw

from sdonnx import Pipeline
from sdonnx import image as imaging
from sdonnx.export.tiny.shapes import Scene, random_scene, render, score

RESULTS = Path(__file__).parent / "results"
GRID_PROMPTS = [
    "a red circle on a blue background",
    "a small yellow square in the top left on a black background",
    "a large green triangle on a white background",
    "a purple circle in the bottom right on an orange background",
    "a small white triangle in the top right on a red background",
    "a large blue square on a yellow background",
    "an orange circle in the bottom left on a green background",
    "a black square in the center on a white background",
    "a small red triangle in the bottom right on a purple background",
    "a large yellow circle on a blue background",
    "a green square in the top right on a black background",
    "a small blue triangle in the top left on an orange background",
]


def fresh_scenes(n: int, seed: int) -> list[Scene]:
    """Captions drawn with a seed used nowhere in training or tuning."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(n)]


def generate(pipe: Pipeline, scenes: list[Scene], seed: int, **options) -> list[Image.Image]:
    images = []
    for k, scene in enumerate(scenes):
        images += pipe.txt2img(scene.caption(), seed=seed + k, **options)
    return images


def evaluate(pipe: Pipeline, scenes: list[Scene], seed: int, **options) -> dict:
    start = time.perf_counter()
    acc = score(scenes, generate(pipe, scenes, seed, **options))
    acc["seconds"] = round(time.perf_counter() - start, 1)
    return acc


def vae_round_trip(pipe: Pipeline, scenes: list[Scene]) -> dict:
    """The scenes' exact renders encoded and decoded by the folder's VAE, judged like generated pictures."""
    start = time.perf_counter()
    images = []
    for scene in scenes:
        images += imaging.to_pil(pipe._decode(pipe._encode(imaging.to_array(render(scene, pipe.info.defaults.width)))))
    acc = score(scenes, images)
    acc["seconds"] = round(time.perf_counter() - start, 1)
    return acc


def grid(pipe: Pipeline, prompts: list[str], seed: int, cols: int = 4, scale: int = 2) -> Image.Image:
    """Each prompt's picture, enlarged, above its caption."""
    tiles = [pipe.txt2img(p, seed=seed)[0] for p in prompts]
    w, h = tiles[0].width * scale, tiles[0].height * scale
    cell_w, text_h = max(w, 220), 34
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * cell_w, rows * (h + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (tile, prompt) in enumerate(zip(tiles, prompts)):
        x, y = (k % cols) * cell_w, (k // cols) * (h + text_h)
        sheet.paste(tile.resize((w, h), Image.NEAREST), (x + (cell_w - w) // 2, y))
        draw.multiline_text((x + 4, y + h + 2), "\n".join(textwrap.wrap(prompt, 36)[:2]), fill="black", spacing=1)
    return sheet


def int8_scheme(folder: Path) -> str:
    """The U-Net's int8 scheme, as `sdonnx export --int8-scheme` names it, read off the folder's sdonnx.json."""
    method = json.loads((folder / "sdonnx.json").read_text())["components"]["unet"]["quantization"]["method"]
    if method.startswith("static"):
        return "qdq"
    return "compact" if "dequantized per call" in method else "dynamic"


def table(results: dict) -> str:
    rows = ["| setting | background colour | shape colour | shape | position | seconds |",
            "|---|---|---|---|---|---|"]
    for name, acc in results.items():
        rows.append(f"| {name} | {acc['background']:.1f}% | {acc['color']:.1f}% | {acc['shape']:.1f}% | "
                    f"{acc['position']:.1f}% | {acc['seconds']} |")
    return "\n".join(rows)


@click.command()
@click.option("--model", type=click.Path(path_type=Path), default=None, help="fp32 folder (default: bundled).")
@click.option("--int8", "int8_dirs", type=click.Path(path_type=Path), multiple=True,
              help="An int8 export of it (repeatable: one per int8 scheme).")
@click.option("--n", default=200, show_default=True, help="Fresh captions to judge.")
@click.option("--seed", default=2026, show_default=True, help="Seed of the captions (and, offset, the noise).")
@click.option("--cache-interval", default=0, help="Also judge the step cache at this interval (folders with it).")
@click.option("--guidance", "guidances", type=float, multiple=True,
              help="Also judge fp32 at this guidance scale (repeatable).")
@click.option("--vae-ceiling", is_flag=True, help="Also judge the true renders through the VAE and back.")
@click.option("--name", default="tiny_quality", show_default=True, help="results/<name>.{json,md}.")
@click.option("--no-grid", is_flag=True, help="Skip the grid picture (results/tiny_grid.png).")
def main(model: Path | None, int8_dirs: tuple[Path, ...], n: int, seed: int, cache_interval: int,
         guidances: tuple[float, ...], vae_ceiling: bool, name: str, no_grid: bool) -> None:
    pipe = Pipeline.load(model)
    scenes = fresh_scenes(n, seed)
    d = pipe.info.defaults
    noise = seed * 1000
    results = {f"fp32, defaults ({d.scheduler}, {d.steps} steps, guidance {d.guidance})": evaluate(pipe, scenes, noise)}
    results["fp32, guidance 1 (none)"] = evaluate(pipe, scenes, noise, guidance=1.0)
    for g in guidances:
        results[f"fp32, guidance {g}"] = evaluate(pipe, scenes, noise, guidance=g)
    if vae_ceiling:
        results["true renders through the VAE (no U-Net)"] = vae_round_trip(pipe, scenes)
    if cache_interval > 1:
        results[f"fp32, step cache interval {cache_interval}"] = evaluate(pipe, scenes, noise,
                                                                         cache_interval=cache_interval)
    for int8_dir in int8_dirs:
        results[f"int8 ({int8_scheme(int8_dir)}), defaults"] = evaluate(Pipeline.load(int8_dir), scenes, noise)
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"model": str(pipe.info.path), "captions": n, "caption_seed": seed, "results": results,
              "python": sys.version.split()[0], "machine": platform.machine()}
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = (f"Tiny model, {n} fresh captions (seed {seed}), judged by `sdonnx.export.tiny.shapes.judge`.\n\n"
          + table(results) + "\n")
    (RESULTS / f"{name}.md").write_text(md)
    if not no_grid:
        grid(pipe, GRID_PROMPTS, seed=7).save(RESULTS / "tiny_grid.png")
    click.echo(md)


if __name__ == "__main__":
    main()
