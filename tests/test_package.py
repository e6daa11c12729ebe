import subprocess
import sys

from click.testing import CliRunner

import sdonnx
from sdonnx.cli import main


def test_version_and_help():
    runner = CliRunner()
    out = runner.invoke(main, ["--version"])
    assert out.exit_code == 0
    assert sdonnx.__version__ in out.output
    out = runner.invoke(main, ["--help"])
    assert out.exit_code == 0
    assert "Usage" in out.output


def test_runtime_import_avoids_torch():
    code = (
        "import sys, sdonnx, sdonnx.cli\n"
        "bad = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
