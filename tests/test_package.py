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
