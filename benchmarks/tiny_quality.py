"""Quality of the bundled tiny model, judged by the shapes evaluator on fresh captions.

    python benchmarks/tiny_quality.py [--model DIR] [--int8 DIR ...] [--int8-provider cpu|openvino ...]
                                      [--openvino IR_DIR ...] [--cache-interval K] [--guidance G ...]
                                      [--n 200] [--seeds 1] [--seed 2026] [--name tiny_quality] [--no-grid]

Reports background colour, shape colour, shape and position accuracy (%) at the folder's default
settings, at guidance 1 (no guidance), at any other `--guidance`, with the step cache, given int8 folders
for each (on each `--int8-provider`), and with `--vae-ceiling` for the true renders through the VAE and back (what
a perfect U-Net would score); writes benchmarks/results/<name>.{json,md} (default tiny_quality) and a captioned grid
PNG. With `--seeds K` every caption is drawn K times (K noise seeds). Beside the accuracies: shape accuracy by
the caption's size, and each setting paired with guidance 1 on the same captions and noise (pictures whose
shape only one of the two got right, with McNemar's exact two-sided p-value).

`--openvino IR_DIR` (repeatable: prepare.py's openvino-fp32 and openvino-int8 folders of the bundled weights) also
judges OpenVINO's own pipeline, run in its venv (peers.py) by openvino_images.py at our folder's default steps,
guidance and size, with its folder's own scheduler, at OpenVINO's default precision. The two runtimes' random
generators differ, so every picture starts from noise drawn here (`start_noise`, what our runtime draws for the
seed) and handed to both; with DDIM, which adds no noise after the start, the two pipelines then see the same
inputs all the way, and pairing their pictures is meaningful. A further table then pairs each int8 setting with
its own system's fp32 and our int8 with OpenVINO's.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageDraw

from sdonnx import Pipeline
from sdonnx import image as imaging
from sdonnx.errors import SdonnxError
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


def noise_seeds(n: int, seed: int, seeds: int = 1) -> list[int]:
    """The noise seed of every picture, in drawing order: seed + k, then seed + n + k, ... (k: the caption's index)."""
    return [seed + rep * n + k for rep in range(seeds) for k in range(n)]


def latent_shape(pipe: Pipeline) -> tuple[int, int, int, int]:
    """One picture's latents at the folder's default size."""
    d, f = pipe.info.defaults, pipe.info.vae_scale_factor
    return 1, pipe.info.latent_channels, d.height // f, d.width // f


def start_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Unit-variance starting noise for a seed: what our runtime draws itself, handed to every runtime alike."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def generate(pipe: Pipeline, scenes: list[Scene], seed: int, seeds: int = 1, **options) -> list[Image.Image]:
    """Each caption drawn with `seeds` noise seeds (noise_seeds), from start_noise."""
    shape = latent_shape(pipe)
    return [image for s, scene in zip(noise_seeds(len(scenes), seed, seeds), scenes * seeds)
            for image in pipe.txt2img(scene.caption(), seed=s, latents=start_noise(s, shape), **options)]


def evaluate(pipe: Pipeline, scenes: list[Scene], seed: int, seeds: int = 1, **options) -> dict:
    """Accuracies over every drawn picture, shape accuracy by caption size, and which shapes came out right."""
    start = time.perf_counter()
    images = generate(pipe, scenes, seed, seeds, **options)
    return judged(images, scenes * seeds, time.perf_counter() - start)


def judged(images: list, drawn: list[Scene], seconds: float) -> dict:
    """evaluate()'s result for pictures (PIL or H x W x 3 uint8) drawn for these scenes, in order."""
    if len(images) != len(drawn):
        raise SystemExit(f"{len(images)} pictures for {len(drawn)} captions")
    verdicts = [judge(image) for image in images]
    acc = accuracy(drawn, verdicts)
    acc["seconds"] = round(seconds, 1)
    acc["shape_hits"] = [j.shape == scene.shape for scene, j in zip(drawn, verdicts)]
    acc["color_hits"] = [j.color == scene.color for scene, j in zip(drawn, verdicts)]
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
    """The U-Net's int8 scheme, as `sdonnx export --int8-scheme` names it, read off the folder's sdonnx.json (the
    exporter's own description of each scheme; older folders' descriptions by their wording)."""
    from sdonnx.export.quantize import METHODS

    method = json.loads((folder / "sdonnx.json").read_text())["components"]["unet"]["quantization"]["method"]
    named = [kind for kind, text in METHODS.items() if text == method]
    if named:
        return named[0]
    if method.startswith("static"):  # the openvino scheme also quantizes the linear layers statically
        return "openvino" if "linear layers" in method else "qdq"
    return "compact" if "dequantized per call" in method else "dynamic"


def int8_label(folder: Path, provider: str) -> str:
    """The results' name of an int8 folder's pictures (an int8 VAE decoder, `--int8-vae`, and the provider named
    where it is not ONNX Runtime's CPU)."""
    components = json.loads((folder / "sdonnx.json").read_text())["components"]
    vae = components.get("vae_decoder", {}).get("precision") == "int8"
    return (f"int8 ({int8_scheme(folder)}{' + int8 VAE' if vae else ''}), defaults" +
            ("" if provider == "cpu" else f", provider {provider}"))


OPENVINO_IMAGES = Path(__file__).with_name("openvino_images.py")


def openvino_kind(folder: Path) -> str:
    """"hybrid int8" for an NNCF hybrid quantization (openvino_int8.py), else what the IR's weights are."""
    config = folder / "openvino_config.json"
    quantization = (json.loads(config.read_text()).get("quantization_config") if config.is_file() else None) or {}
    if quantization.get("quant_method") == "hybrid":
        return "hybrid int8"
    return f"int{quantization['bits']} weights" if quantization.get("bits") else "fp32 IR"


def check_openvino(folder: Path) -> None:
    """A one-line exit unless `folder` is an OpenVINO IR pipeline and the OpenVINO venv is there to run it."""
    import peers

    if not (folder / "unet" / "openvino_model.xml").is_file():
        raise SystemExit(f"{folder} holds no OpenVINO U-Net (unet/openvino_model.xml)")
    peers.interpreter("openvino-fp32")


def openvino_request(path: Path, pipe: Pipeline, scenes: list[Scene], seed: int, seeds: int = 1) -> None:
    """openvino_images.py's request: every picture's caption and starting noise, at our folder's defaults."""
    d = pipe.info.defaults
    if d.width != d.height:
        raise SystemExit(f"OpenVINO's pictures are square here; the folder's default size is {d.width}x{d.height}")
    shape = latent_shape(pipe)
    order = noise_seeds(len(scenes), seed, seeds)
    np.savez(path, captions=np.array([s.caption() for s in scenes * seeds]),
             latents=np.concatenate([start_noise(k, shape) for k in order]), steps=d.steps, guidance=d.guidance,
             size=d.width)


def read_openvino_images(path: Path) -> tuple[np.ndarray, dict]:
    """openvino_images.py's pictures (N, H, W, 3 uint8) and what it ran with (precision, scheduler, seconds)."""
    with np.load(path) as out:
        images = out["images"]
        facts = {"precision": str(out["precision"]), "scheduler": str(out["scheduler"]),
                 "seconds": float(out["seconds"])}
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise SystemExit(f"{path}: pictures must be N x H x W x 3 uint8, got {images.dtype} {images.shape}")
    return images, facts


def evaluate_openvino(folder: Path, pipe: Pipeline, scenes: list[Scene], seed: int, seeds: int = 1) -> tuple[str, dict]:
    """OpenVINO's pipeline on `folder`, in its venv, from the same captions and starting noise; (label, result)."""
    import peers
    from sdonnx.model import scheduler_name

    check_openvino(folder)
    with tempfile.TemporaryDirectory() as tmp:
        request, out = Path(tmp) / "request.npz", Path(tmp) / "images.npz"
        openvino_request(request, pipe, scenes, seed, seeds)
        done = subprocess.run([peers.interpreter("openvino-fp32"), str(OPENVINO_IMAGES), str(folder), str(request),
                               str(out)], capture_output=True, text=True)
        if done.returncode:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"OpenVINO's pipeline failed on {folder}: {tail}")
        images, facts = read_openvino_images(out)
    acc = judged(list(images), scenes * seeds, facts["seconds"])
    acc["precision"] = facts["precision"]
    d = pipe.info.defaults
    sampler = scheduler_name({"_class_name": facts["scheduler"]})
    return (f"OpenVINO {openvino_kind(folder)}, defaults ({sampler}, {d.steps} steps, guidance {d.guidance}, "
            f"{facts['precision']})", acc)


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


def pairs_table(results: dict, pairs: list[tuple[str, str]]) -> str:
    """Each pair of settings on the same captions and noise: pictures whose shape (and shape colour) only one of
    the two got right, with McNemar's p."""
    rows = ["| setting | against | shape right only in the setting | only in the other | McNemar p | "
            "shape colour right only in the setting | only in the other | McNemar p |",
            "|---|---|---|---|---|---|---|---|"]
    for a, b in pairs:
        cells = []
        for hits in ("shape_hits", "color_hits"):
            p = paired(results[a][hits], results[b][hits])
            cells.append(f"{p['only_this']} | {p['only_baseline']} | {p['p']:.2g}")
        rows.append(f"| {a} | {b} | {' | '.join(cells)} |")
    return "\n".join(rows)


def system_pairs(fp32: str, ours_int8: list[str], openvino: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each int8 setting against its own system's fp32, OpenVINO's fp32 against ours, our int8 against OpenVINO's.
    openvino: (its folder's kind, label) per folder."""
    ov_fp32 = [label for kind, label in openvino if kind == "fp32 IR"]
    ov_int8 = [label for kind, label in openvino if kind != "fp32 IR"]
    pairs = [(a, fp32) for a in ours_int8] + [(b, fp32) for b in ov_fp32]
    pairs += [(b, base) for base in ov_fp32[:1] for b in ov_int8]
    return pairs + [(a, b) for a in ours_int8 for b in ov_int8]


@click.command()
@click.option("--model", type=click.Path(path_type=Path), default=None, help="fp32 folder (default: bundled).")
@click.option("--int8", "int8_dirs", type=click.Path(path_type=Path), multiple=True,
              help="An int8 export of it (repeatable: one per int8 scheme).")
@click.option("--int8-provider", "int8_providers", type=click.Choice(["cpu", "openvino"]), multiple=True,
              default=("cpu",), show_default=True, help="Run the int8 folders on this provider (repeatable: each).")
@click.option("--openvino", "openvino_dirs", type=click.Path(path_type=Path), multiple=True,
              help="Also judge OpenVINO's own pipeline on this IR folder of the same weights (repeatable).")
@click.option("--n", default=200, show_default=True, help="Fresh captions to judge.")
@click.option("--seeds", default=1, show_default=True, help="Noise seeds per caption.")
@click.option("--seed", default=2026, show_default=True, help="Seed of the captions (and, offset, the noise).")
@click.option("--cache-interval", default=0, help="Also judge the step cache at this interval (folders with it).")
@click.option("--guidance", "guidances", type=float, multiple=True,
              help="Also judge fp32 at this guidance scale (repeatable).")
@click.option("--vae-ceiling", is_flag=True, help="Also judge the true renders through the VAE and back.")
@click.option("--name", default="tiny_quality", show_default=True, help="results/<name>.{json,md}.")
@click.option("--no-grid", is_flag=True, help="Skip the grid picture (results/tiny_grid.png).")
def main(model: Path | None, int8_dirs: tuple[Path, ...], int8_providers: tuple[str, ...],
         openvino_dirs: tuple[Path, ...], n: int, seeds: int, seed: int, cache_interval: int,
         guidances: tuple[float, ...], vae_ceiling: bool, name: str, no_grid: bool) -> None:
    for folder in openvino_dirs:  # before minutes of our own pictures
        check_openvino(folder)
    try:
        pipe = Pipeline.load(model)
        int8_pipes = {int8_label(folder, provider): Pipeline.load(folder, provider=provider)
                      for folder in int8_dirs for provider in int8_providers}
    except SdonnxError as err:
        raise SystemExit(str(err))
    scenes = fresh_scenes(n, seed)
    d = pipe.info.defaults
    noise = seed * 1000
    unguided = "fp32, guidance 1 (none)"
    fp32 = f"fp32, defaults ({d.scheduler}, {d.steps} steps, guidance {d.guidance})"
    results = {fp32: evaluate(pipe, scenes, noise, seeds)}
    results[unguided] = evaluate(pipe, scenes, noise, seeds, guidance=1.0)
    for g in guidances:
        results[f"fp32, guidance {g}"] = evaluate(pipe, scenes, noise, seeds, guidance=g)
    if vae_ceiling:
        results["true renders through the VAE (no U-Net)"] = vae_round_trip(pipe, scenes)
    if cache_interval > 1:
        results[f"fp32, step cache interval {cache_interval}"] = evaluate(pipe, scenes, noise, seeds,
                                                                         cache_interval=cache_interval)
    for label, int8_pipe in int8_pipes.items():
        results[label] = evaluate(int8_pipe, scenes, noise, seeds)
    openvino = []
    for folder in openvino_dirs:
        label, results[label] = evaluate_openvino(folder, pipe, scenes, noise, seeds)
        openvino.append((openvino_kind(folder), label))
    RESULTS.mkdir(parents=True, exist_ok=True)
    # shape_hits (and color_hits) as one 0/1 string per setting, in drawing order (seed by seed, caption by caption)
    stored = {k: {f: "".join("01"[h] for h in x) if f.endswith("_hits") else x for f, x in v.items()}
              for k, v in results.items()}
    report = {"model": str(pipe.info.path), "captions": n, "seeds_per_caption": seeds, "caption_seed": seed,
              "results": stored, "python": sys.version.split()[0], "machine": platform.machine()}
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    drawn = f"{n} fresh captions" + (f" x {seeds} noise seeds" if seeds > 1 else "")
    md = (f"Tiny model, {drawn} (caption seed {seed}), judged by `sdonnx.export.tiny.shapes.judge`.\n\n"
          + table(results) + "\n\nShape accuracy by the caption's size, and each setting against guidance 1 on the"
          " same captions and noise (pictures whose shape only one of the two got right):\n\n"
          + guidance_table(results, unguided) + "\n")
    if openvino:
        md += ("\nOpenVINO's pipeline (optimum-intel, in its own venv) started from the same noise as ours, passed to"
               " it: its seconds are generation only, after compiling. Each int8 setting against its own system's"
               " fp32, and ours against OpenVINO's, on the same captions and noise (pictures whose shape, or shape"
               " colour, only one of the two got right):\n\n"
               + pairs_table(results, system_pairs(fp32, list(int8_pipes), openvino)) + "\n")
    (RESULTS / f"{name}.md").write_text(md)
    if not no_grid:
        grid(pipe, GRID_PROMPTS, seed=7).save(RESULTS / "tiny_grid.png")
    click.echo(md)


if __name__ == "__main__":
    main()
