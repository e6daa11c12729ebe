"""The `sdonnx` command line."""

from __future__ import annotations

import importlib
from pathlib import Path

import click

from . import __version__
from .model import VAES

# Commands that need the [export] extra (torch) are imported only when invoked,
# so `sdonnx generate` never pays for, or requires, torch.
LAZY_COMMANDS = {"export": ("sdonnx.export.cli", "export")}


class SdonnxGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str):
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name]
            try:
                return getattr(importlib.import_module(module), attr)
            except ImportError as err:
                return _unavailable(name, err.name or str(err))
        return super().get_command(ctx, name)


def _unavailable(name: str, missing: str) -> click.Command:
    """A stand-in that explains, when run, which extra the real command needs."""

    def fail(**_: object) -> None:
        raise click.ClickException(
            f"`sdonnx {name}` needs the export extra ({missing} is not installed): pip install 'sdonnx[export]'"
        )

    return click.Command(name, callback=fail, help="(needs the export extra: pip install 'sdonnx[export]')",
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})


@click.group(cls=SdonnxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sdonnx")
def main() -> None:
    """Stable Diffusion on ONNX Runtime: export models, generate images, benchmark."""


def _fail(err: Exception) -> click.ClickException:
    """One line for the user, no traceback."""
    text = str(err).strip().splitlines()
    return click.ClickException(text[0] if text else type(err).__name__)


def _outputs(out: Path, n: int) -> list[Path]:
    """out.png for one image; out-1.png, out-2.png, ... for several."""
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{k}{out.suffix or '.png'}") for k in range(1, n + 1)]


# options `generate` and `bench` share: a run is timed as it is generated
MODEL = click.option("--model", "model_dir", type=click.Path(path_type=Path),
                     help="Model folder (default: the bundled tiny model).")
PROVIDER = click.option("--provider", default="cpu", show_default=True, help="cpu, cuda, dml or auto.")
CACHE_INTERVAL = click.option("--cache-interval", type=int, default=1, show_default=True,
                              help="Run the full U-Net every k-th step, the shallow graph in between (folders "
                                   "exported with --step-cache).")
LOW_MEMORY = click.option("--low-memory", is_flag=True, help="Load each component only while it runs, no memory "
                          "arena, VAE decoded in tiles (bench: times only the txt2img runs and their steps).")
VAE = click.option("--vae", type=click.Choice(list(VAES), case_sensitive=False),
                   help="Decode (and encode) with the full VAE or the tiny one (folders exported with --tiny-vae); "
                        "default: the model's.")
PREVIEW_EVERY = click.option("--preview-every", type=click.IntRange(min=1), metavar="K",
                             help="Every K steps, the tiny VAE's half-size picture of the current latents (generate: "
                                  "written to OUT-preview.png, removed once the image is written; bench: timed).")



def run_options(command):
    """The options of how a generation runs, which `generate` and `bench` share."""
    for option in reversed((CACHE_INTERVAL, LOW_MEMORY, VAE, PREVIEW_EVERY)):
        command = option(command)
    return command


@main.command()
@click.argument("prompt")
@MODEL
@click.option("--negative-prompt", default="", help="What to steer away from.")
@click.option("--steps", type=int, help="Denoising steps (default: the model's).")
@click.option("--guidance", type=float, help="Classifier-free guidance scale; <= 1 turns it off (an LCM U-Net "
              "takes it as an input instead).")
@click.option("--scheduler", help="ddim ddpm pndm euler euler_a heun dpmpp_2m dpmpp_2m_karras lcm")
@click.option("--seed", type=int, help="Noise seed (default: random, recorded in the PNG).")
@click.option("--width", type=int, help="Pixels, a multiple of 8.")
@click.option("--height", type=int, help="Pixels, a multiple of 8.")
@click.option("--init-image", type=click.Path(path_type=Path), help="Start from this image (img2img).")
@click.option("--strength", type=float, help="How much of --init-image to repaint, in (0, 1].")
@click.option("--mask", type=click.Path(path_type=Path),
              help="Inpaint the white part of this mask (needs --init-image).")
@PROVIDER
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("sdonnx.png"), show_default=True)
@click.option("--num-images", type=int, default=1, show_default=True)
@run_options
def generate(prompt: str, model_dir: Path | None, negative_prompt: str, steps: int | None, guidance: float | None,
             scheduler: str | None, seed: int | None, width: int | None, height: int | None,
             init_image: Path | None, strength: float | None, mask: Path | None, provider: str, output: Path,
             num_images: int, cache_interval: int, low_memory: bool, vae: str | None,
             preview_every: int | None) -> None:
    """Generate images from PROMPT and write them as PNGs carrying their parameters."""
    from .image import save_png
    from .pipeline import Pipeline

    if mask is not None and init_image is None:
        raise click.ClickException("--mask needs --init-image (the picture to inpaint)")
    if strength is not None and init_image is None:
        raise click.ClickException("--strength needs --init-image")
    if init_image is not None and strength is None:
        strength = 1.0 if mask is not None else 0.8
    options = dict(negative_prompt=negative_prompt, steps=steps, guidance=guidance, scheduler=scheduler,
                   seed=seed, width=width, height=height, num_images=num_images, cache_interval=cache_interval,
                   vae=vae)
    preview = output.with_name(f"{output.stem}-preview{output.suffix or '.png'}") if preview_every else None
    previewed: list = []  # set once this run wrote the preview, which then is its own to remove
    try:
        pipe = Pipeline.load(model_dir, provider=provider, low_memory=low_memory)
        if preview is not None:
            pipe.info.vae("tiny")  # a one-line error before any work when the folder has no tiny VAE
        images = _with_progress(pipe, prompt, init_image, mask, strength, options, preview, preview_every, previewed)
        # exactly what the run used (defaults and the drawn seed resolved by the pipeline)
        params = dict(images[0].info["sdonnx"].parameters(), init_image=init_image and init_image.name,
                      mask=mask and mask.name)
        # all images exist before the first file is written, so a failure leaves no partial set
        for k, (img, path) in enumerate(zip(images, _outputs(output, len(images)))):
            save_png(img, path, {**params, "image": f"{k + 1}/{len(images)}"} if len(images) > 1 else params)
            click.echo(str(path))
    except (ValueError, OSError) as err:
        raise _fail(err) from None
    finally:
        if previewed:
            preview.unlink(missing_ok=True)


def _with_progress(pipe, prompt: str, init_image: Path | None, mask: Path | None, strength: float | None,
                   options: dict, preview: Path | None = None, every: int | None = None,
                   previewed: list | None = None) -> list:
    """Run the task the options ask for, with a progress bar over the denoising steps; with `preview`, every
    `every` steps (not the last) the tiny VAE's picture of the first image's latents is written there."""
    from tqdm import tqdm

    from .image import save_png
    from .pipeline import PREVIEW_DOWNSCALE

    bars: list = []  # made at the first step, so errors found before denoising print no empty bar

    def progress(step: int, total: int, latents) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="denoising", unit="step", leave=False, disable=None))  # no bar off a TTY
        bars[0].update(1)
        if preview is not None and (step + 1) % every == 0 and step + 1 < total:
            save_png(pipe.preview(latents[:1], PREVIEW_DOWNSCALE)[0], preview, {"preview": f"step {step + 1}/{total}"})
            previewed.append(step)

    try:
        if mask is not None:
            return pipe.inpaint(prompt, init_image, mask, strength=strength, callback=progress, **options)
        if init_image is not None:
            return pipe.img2img(prompt, init_image, strength=strength, callback=progress, **options)
        return pipe.txt2img(prompt, callback=progress, **options)
    finally:
        for bar in bars:
            bar.close()


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path), required=False)
@click.option("--verify", is_flag=True, help="Hash every file, large ones included.")
def info(model_dir: Path | None, verify: bool) -> None:
    """Show what a model folder holds (default: the bundled tiny model): components, precision, sizes, family,
    defaults, checksums."""
    from .model import default_model_dir, file_status, read_model

    try:
        m = read_model(model_dir if model_dir is not None else default_model_dir(), check=False)
    except (ValueError, OSError) as err:
        raise _fail(err) from None
    d = m.defaults
    click.echo(f"model        {m.path}")
    click.echo(f"format       {'sdonnx ' + str(m.meta.get('format')) if m.meta else 'optimum (no sdonnx.json)'}"
               + (f", exported by {m.meta['exporter']}" if m.meta.get("exporter") else ""))
    if m.meta.get("source"):
        click.echo(f"source       {m.meta['source']}")
    click.echo(f"family       {m.family} ({m.prediction_type}, {m.latent_channels} latent channels, "
               f"U-Net in {m.unet_in_channels}, VAE /{m.vae_scale_factor}, scale {m.scaling_factor})"
               + (f"; LCM U-Net (guidance input of {m.guidance_embedding_dim})" if m.is_lcm else ""))
    loras = (m.meta.get("export_report") or {}).get("loras")
    if loras:
        click.echo("loras        " + ", ".join(f"{x['file']} x {x['scale']} ({x['layers']} layers)" for x in loras))
    click.echo(f"defaults     {d.steps} steps, guidance {d.guidance}, {d.scheduler}, {d.width}x{d.height}, {d.vae} VAE"
               + (f"; static shape {m.static_shape}" if m.static_shape else ""))
    click.echo("components")
    for name, path in m.components.items():
        size = sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())
        click.echo(f"  {name:<16} {m.precision(name) or '?':<5} {size / 2**20:10.2f} MiB")
    for name, entry in ((m.meta.get("stream") or {}).get("components") or {}).items():
        parts = entry.get("parts") or []
        biggest = max((p.get("weight_mb", 0) for p in parts), default=0)
        click.echo(f"  {name + ' (streamed)':<22} {len(parts)} parts for --low-memory, the largest {biggest} MiB")
    files = m.meta.get("files") or {}
    if not files:
        click.echo("checksums    none recorded")
        return
    statuses = {rel: file_status(m.path, rel, expect, True if verify else None)
                for rel, expect in sorted(files.items())}
    bad = {rel: s for rel, s in statuses.items() if not s.endswith(" ok")}
    click.echo(f"checksums    {len(statuses) - len(bad)}/{len(statuses)} files ok")
    for rel, status in statuses.items():
        click.echo(f"  {rel:<40} {status}")
    if bad:
        raise click.ClickException(f"corrupt model folder: {', '.join(f'{r} ({s})' for r, s in bad.items())}")


@main.command()
@MODEL
@PROVIDER
@click.option("--size", metavar="WxH", help="Image size (default: the model's).")
@click.option("--steps", type=int, default=5, show_default=True, help="Denoising steps of each txt2img run.")
@click.option("--runs", type=int, default=3, show_default=True, help="Timed runs of each figure, after a warm-up.")
@click.option("--scheduler", help="Sampler of the txt2img runs (default: the model's).")
@run_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench(model_dir: Path | None, provider: str, size: str | None, steps: int, runs: int, scheduler: str | None,
          cache_interval: int, low_memory: bool, vae: str | None, preview_every: int | None, as_json: bool) -> None:
    """Measure load time, per-component and per-step latency and peak memory of a model on this machine."""
    import json

    from .bench import format_table, parse_size, run_bench

    try:
        report = run_bench(model_dir, provider, parse_size(size) if size else None, steps, runs, scheduler,
                           cache_interval=cache_interval, low_memory=low_memory,
                           progress=lambda msg: click.echo(msg, err=True), vae=vae, preview_every=preview_every)
    except (ValueError, OSError) as err:
        raise _fail(err) from None
    click.echo(json.dumps(report, indent=2) if as_json else format_table(report))


if __name__ == "__main__":
    main()
