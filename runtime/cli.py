"""The `sdonnx` command line."""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sdonnx")
def main() -> None:
    """Stable Diffusion on ONNX Runtime: export models, generate images, benchmark."""


if __name__ == "__main__":
    main()
