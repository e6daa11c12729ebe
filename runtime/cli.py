"""The `sdonnx` command line."""

from __future__ import annotations

import importlib

import click

from . import __version__

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


if __name__ == "__main__":
    main()
