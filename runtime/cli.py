"""The `sdonnx` command line."""

from __future__ import annotations

import importlib
from pathlib import Path

import click
from click.core import ParameterSource

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
PROVIDER = click.option("--provider", default="cpu", show_default=True, help="cpu, cuda, dml, openvino (the sdonnx[openvino] extra) or auto.")
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
@click.argument("prompt", required=False)
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
@click.option("--prompt-syntax", type=click.Choice(["a1111", "none"], case_sensitive=False), default="a1111",
              show_default=True, help="a1111: (word:1.3), ((word)), [word], \\( for a literal bracket, BREAK; "
                                      "none: brackets are plain text.")
@click.option("--clip-skip", type=click.IntRange(min=1), default=1, show_default=True,
              help="Condition on the text encoder's N-th layer from the end (A1111's meaning: 1 = the last).")
@run_options
@click.option("--from-png", type=click.Path(path_type=Path), metavar="FILE",
              help="Take the prompt and settings from the parameters a picture carries (ours or AUTOMATIC1111's "
                   "infotext: a PNG's text chunk, a JPEG/WebP's EXIF comment); options given here override them.")
@click.pass_context
def generate(ctx: click.Context, prompt: str | None, model_dir: Path | None, negative_prompt: str, steps: int | None,
             guidance: float | None, scheduler: str | None, seed: int | None, width: int | None, height: int | None,
             init_image: Path | None, strength: float | None, mask: Path | None, provider: str, output: Path,
             num_images: int, prompt_syntax: str, clip_skip: int, cache_interval: int, low_memory: bool,
             vae: str | None, preview_every: int | None, from_png: Path | None) -> None:
    """Generate images from PROMPT (or --from-png FILE) and write them as PNGs carrying their parameters."""
    from .pipeline import Pipeline

    if mask is not None and init_image is None:
        raise click.ClickException("--mask needs --init-image (the picture to inpaint)")
    if strength is not None and init_image is None:
        raise click.ClickException("--strength needs --init-image")
    if prompt is None and from_png is None:
        raise click.ClickException("give a PROMPT, or --from-png FILE to take it from a picture")
    options = dict(prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                   scheduler=scheduler, seed=seed, width=width, height=height, num_images=num_images,
                   cache_interval=cache_interval, vae=vae, strength=strength, prompt_syntax=prompt_syntax.lower(),
                   clip_skip=clip_skip)
    read = _from_png(ctx, from_png, options, init_image is not None) if from_png is not None else None
    if init_image is not None and options["strength"] is None:
        options["strength"] = 1.0 if mask is not None else 0.8
    prompt, strength = options.pop("prompt"), options.pop("strength")
    pick = read.batch[1] if read is not None and read.batch and not _given(ctx, "num_images") else None
    preview = output.with_name(f"{output.stem}-preview{output.suffix or '.png'}") if preview_every else None
    previewed: list = []  # set once this run wrote the preview, which then is its own to remove
    try:
        pipe = Pipeline.load(model_dir, provider=provider, low_memory=low_memory)
        if read is not None and read.model and read.model != pipe.info.path.name:
            click.echo(f"note: {from_png.name} was made with model {read.model!r}; generating with "
                       f"{pipe.info.path.name!r}", err=True)
        if preview is not None:
            pipe.info.vae("tiny")  # a one-line error before any work when the folder has no tiny VAE
        images = _with_progress(pipe, prompt, init_image, mask, strength, options, preview, preview_every, previewed)
        _write(images, output, pick, {"Init image": init_image and init_image.name, "Mask": mask and mask.name})
    except (ValueError, OSError) as err:
        raise _fail(err) from None
    finally:
        if previewed:
            preview.unlink(missing_ok=True)


def _write(images: list, output: Path, pick: int | None, extra: dict) -> None:
    """The PNGs, each with exactly what the run used (defaults and the drawn seed resolved by the pipeline); of
    a batch regenerated for one picture (`pick`), only that one. All images exist before the first file is
    written, so a failure leaves no partial set."""
    from .image import save_png

    n = len(images)
    chosen = list(enumerate(images)) if pick is None else [(pick, images[pick])]
    for (k, img), path in zip(chosen, _outputs(output, len(chosen))):
        batch = {"Batch size": n, "Batch pos": k} if n > 1 else {}
        save_png(img, path, img.info["sdonnx"].infotext({**extra, **batch}))
        click.echo(str(path))


def _given(ctx: click.Context, name: str) -> bool:
    """Whether an option was set by the user (command line or environment), not left at its default."""
    source = ctx.get_parameter_source(name) if name in ctx.params else None
    return source is not None and source is not ParameterSource.DEFAULT


def _from_png(ctx: click.Context, path: Path, options: dict, img2img: bool):
    """Fill `options` from the picture's infotext where the user gave nothing; prints one note of the fields
    left unused. Returns the infotext's Recipe."""
    from . import infotext
    from .errors import SdonnxError

    try:
        fields = infotext.parse(infotext.read_image(path))
        if not infotext.has_settings(fields):
            raise SdonnxError(f"{path} carries no generation settings (no 'Steps: ..., Sampler: ...' line)")
    except ValueError as err:
        raise _fail(err) from None
    try:
        read = infotext.recipe(fields)
    except ValueError as err:
        raise _fail(ValueError(f"{path}: {err}")) from None
    found, ignored = dict(read.options), list(read.ignored)
    if not img2img and "strength" in found:  # A1111 also writes it for the hires pass of a txt2img
        del found["strength"]
        ignored.append("Denoising strength (no --init-image)")
    if read.batch:
        found["num_images"] = read.batch[0]
    for name, value in found.items():
        if not _given(ctx, name):
            options[name] = value
    if ignored:
        click.echo(f"note: ignored from {path.name}: {', '.join(ignored)}", err=True)
    return read


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
    if m.meta.get("embeddings"):
        click.echo("embeddings   " + ", ".join(f"{e['token']} ({e['vectors']} vectors, {e['file']})"
                                               for e in m.meta["embeddings"]))
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


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@main.command()
@MODEL
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback: this machine only).")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True)
@click.option("--max-queue", type=click.IntRange(min=1), default=16, show_default=True,
              help="Requests that may wait; past it the server answers 429 with Retry-After.")
@click.option("--max-pixels", type=click.IntRange(min=64), default=2048 * 1024, show_default=True,
              help="Refuse images of more pixels (width x height).")
@PROVIDER
@click.option("--api-key", envvar="SDONNX_API_KEY", help="Require this bearer token (env SDONNX_API_KEY).")
@click.option("--api-auth", metavar="USER:PASS", help="Require HTTP basic auth, as A1111's --api-auth.")
@click.option("--timeout", type=click.FloatRange(min=0), default=600.0, show_default=True,
              help="Seconds a request may wait and run; 0: no limit.")
@click.option("--batch/--no-batch", "batching", default=True, show_default=True,
              help="Run waiting txt2img requests that differ only in seed as one batched call.")
@click.option("--ray", "use_ray", is_flag=True, help="Serve through Ray Serve replicas (the ray extra).")
@click.option("--replicas", type=click.IntRange(min=1), default=2, show_default=True, help="Ray Serve replicas.")
def serve(model_dir: Path | None, host: str, port: int, max_queue: int, max_pixels: int | None, provider: str,
          api_key: str | None, api_auth: str | None, timeout: float, batching: bool, use_ray: bool,
          replicas: int) -> None:
    """Serve AUTOMATIC1111's /sdapi/v1 and OpenAI's /v1/images/generations APIs and a page at /."""
    if api_auth is not None and ":" not in api_auth:
        raise click.ClickException("--api-auth must be USER:PASS")
    try:
        from .serve.app import ServeConfig
        from .serve import server
    except ImportError as err:
        raise click.ClickException(f"`sdonnx serve` needs the serve extra ({err.name} is not installed): "
                                   "pip install 'sdonnx[serve]'") from None
    if host not in LOOPBACK and not (api_key or api_auth):
        click.echo(f"warning: serving on {host} without --api-key or --api-auth: anyone who reaches it can use it",
                   err=True)
    config = ServeConfig(max_pixels=max_pixels, timeout=timeout or None, api_key=api_key, api_auth=api_auth)
    try:
        if use_ray:
            try:
                from .serve import ray as ray_serve
            except ImportError as err:
                raise click.ClickException(f"`sdonnx serve --ray` needs the ray extra ({err.name} is not "
                                           "installed): pip install 'sdonnx[ray]'") from None
            ray_serve.run(model_dir, provider, host, port, max_queue, batching, config, replicas)
        else:
            server.run(model_dir, provider, host, port, max_queue, batching, config)
    except (ValueError, OSError) as err:
        raise _fail(err) from None


if __name__ == "__main__":
    main()
