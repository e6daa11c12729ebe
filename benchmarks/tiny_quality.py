"""Quality of the bundled tiny model, judged by the shapes evaluator on fresh captions.

    python benchmarks/tiny_quality.py [--model DIR] [--int8 DIR ...] [--cache-interval K] [--guidance G ...]
                                      [--n 200] [--seeds 1] [--seed 2026] [--name tiny_quality] [--no-grid]

Reports background colour, shape colour, shape and position accuracy (%) at the folder's default
settings, at guidance 1 (no guidance), at any other `--guidance`, with the step cache, given int8 folders
for each, and with `--vae-ceiling` for the true renders through the VAE and back (what a perfect U-Net would
score); writes benchmarks/results/<name>.{json,md} (default tiny_quality) and a captioned grid PNG.
With `--seeds K` every caption is drawn K times (K noise seeds). Beside the accuracies: shape accuracy by
the caption's size, and each setting paired with guidance 1 on the same captions and noise (pictures whose
shape only one of the two got right, with McNemar's exact two-sided p-value).
"""

from __future__ import annotations

import json
import math
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
from sdonnx.export.tiny.shapes import Scene, accuracy, judge, random_scene, render, score

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


def generate(pipe: Pipeline, scenes: list[Scene], seed: int, seeds: int = 1, **options) -> list[Image.Image]:
    """Each caption drawn with `seeds` noise seeds: seed + k, then seed + n + k, ... (k: the caption's index)."""
    images = []
    for rep in range(seeds):
        for k, scene in enumerate(scenes):
            images += pipe.txt2img(scene.caption(), seed=seed + rep * len(scenes) + k, **options)
    return images


def evaluate(pipe: Pipeline, scenes: list[Scene], seed: int, seeds: int = 1, **options) -> dict:
    """Accuracies over every drawn picture, shape accuracy by caption size, and which shapes came out right."""
    start = time.perf_counter()
    images = generate(pipe, scenes, seed, seeds, **options)
    drawn = scenes * seeds
    judged = [judge(image) for image in images]
    acc = accuracy(drawn, judged)
    acc["seconds"] = round(time.perf_counter() - start, 1)
    acc["shape_hits"] = [j.shape == scene.shape for scene, j in zip(drawn, judged)]
    acc["shape_by_size"] = shape_by_size(drawn, acc["shape_hits"])
    return acc


def shape_by_size(scenes: list[Scene], hits: list[bool]) -> dict[str, float]:
    """Shape accuracy (%) per caption size (medium: no size word)."""
    out = {}
    for size in ("small", "medium", "large"):
        picked = [h for s, h in zip(scenes, hits) if (s.size or "medium") == size]
        if picked:
            out[size] = 100.0 * sum(picked) / len(picked)
    return out


def mcnemar(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: the chance of a split at least this uneven of the discordant pairs
    if each were equally likely to go either way (McNemar 1947, binomial form)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired(hits: list[bool], baseline: list[bool]) -> dict:
    """Pictures whose shape only this setting got right, only the baseline got right, and McNemar's p."""
    only_this = sum(h and not b for h, b in zip(hits, baseline))
    only_base = sum(b and not h for h, b in zip(hits, baseline))
    return {"only_this": only_this, "only_baseline": only_base, "p": mcnemar(only_this, only_base)}


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


def guidance_table(results: dict, baseline: str) -> str:
    """Shape accuracy by size, and each generated setting paired with the unguided one."""
    rows = ["| setting | shape: small | medium | large | right only here | right only unguided | McNemar p |",
            "|---|---|---|---|---|---|---|"]
    base = results[baseline]["shape_hits"]
    for name, acc in results.items():
        by = acc.get("shape_by_size")
        if not by:
            continue
        cells = " | ".join(f"{by[s]:.1f}%" if s in by else "-" for s in ("small", "medium", "large"))
        if name == baseline or len(acc["shape_hits"]) != len(base):
            pair = "- | - | -"
        else:
            p = paired(acc["shape_hits"], base)
            pair = f"{p['only_this']} | {p['only_baseline']} | {p['p']:.2g}"
        rows.append(f"| {name} | {cells} | {pair} |")
    return "\n".join(rows)


@click.command()
@click.option("--model", type=click.Path(path_type=Path), default=None, help="fp32 folder (default: bundled).")
@click.option("--int8", "int8_dirs", type=click.Path(path_type=Path), multiple=True,
              help="An int8 export of it (repeatable: one per int8 scheme).")
@click.option("--n", default=200, show_default=True, help="Fresh captions to judge.")
@click.option("--seeds", default=1, show_default=True, help="Noise seeds per caption.")
@click.option("--seed", default=2026, show_default=True, help="Seed of the captions (and, offset, the noise).")
@click.option("--cache-interval", default=0, help="Also judge the step cache at this interval (folders with it).")
@click.option("--guidance", "guidances", type=float, multiple=True,
              help="Also judge fp32 at this guidance scale (repeatable).")
@click.option("--vae-ceiling", is_flag=True, help="Also judge the true renders through the VAE and back.")
@click.option("--name", default="tiny_quality", show_default=True, help="results/<name>.{json,md}.")
@click.option("--no-grid", is_flag=True, help="Skip the grid picture (results/tiny_grid.png).")
def main(model: Path | None, int8_dirs: tuple[Path, ...], n: int, seeds: int, seed: int, cache_interval: int,
         guidances: tuple[float, ...], vae_ceiling: bool, name: str, no_grid: bool) -> None:
    pipe = Pipeline.load(model)
    scenes = fresh_scenes(n, seed)
    d = pipe.info.defaults
    noise = seed * 1000
    unguided = "fp32, guidance 1 (none)"
    results = {f"fp32, defaults ({d.scheduler}, {d.steps} steps, guidance {d.guidance})":
               evaluate(pipe, scenes, noise, seeds)}
    results[unguided] = evaluate(pipe, scenes, noise, seeds, guidance=1.0)
    for g in guidances:
        results[f"fp32, guidance {g}"] = evaluate(pipe, scenes, noise, seeds, guidance=g)
    if vae_ceiling:
        results["true renders through the VAE (no U-Net)"] = vae_round_trip(pipe, scenes)
    if cache_interval > 1:
        results[f"fp32, step cache interval {cache_interval}"] = evaluate(pipe, scenes, noise, seeds,
                                                                         cache_interval=cache_interval)
    for int8_dir in int8_dirs:
        results[f"int8 ({int8_scheme(int8_dir)}), defaults"] = evaluate(Pipeline.load(int8_dir), scenes, noise, seeds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    # shape_hits as one 0/1 string per setting, in drawing order (seed by seed, caption by caption)
    stored = {k: dict(v, shape_hits="".join("01"[h] for h in v["shape_hits"])) if "shape_hits" in v else v
              for k, v in results.items()}
    report = {"model": str(pipe.info.path), "captions": n, "seeds_per_caption": seeds, "caption_seed": seed,
              "results": stored, "python": sys.version.split()[0], "machine": platform.machine()}
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    drawn = f"{n} fresh captions" + (f" x {seeds} noise seeds" if seeds > 1 else "")
    md = (f"Tiny model, {drawn} (caption seed {seed}), judged by `sdonnx.export.tiny.shapes.judge`.\n\n"
          + table(results) + "\n\nShape accuracy by the caption's size, and each setting against guidance 1 on the"
          " same captions and noise (pictures whose shape only one of the two got right):\n\n"
          + guidance_table(results, unguided) + "\n")
    (RESULTS / f"{name}.md").write_text(md)
    if not no_grid:
        grid(pipe, GRID_PROMPTS, seed=7).save(RESULTS / "tiny_grid.png")
    click.echo(md)


if __name__ == "__main__":
    main()
