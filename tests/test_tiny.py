"""The bundled tiny model: its folder, its defaults, and that it draws what it is asked for."""

import json

import numpy as np
import pytest

from sdonnx.export.folder import DEFAULTS, source_defaults


def test_source_defaults_read_from_a_folder(tmp_path):
    assert source_defaults(str(tmp_path)) == {}
    assert source_defaults("random:sd15") == {}
    (tmp_path / "sdonnx_defaults.json").write_text(json.dumps({"steps": 12, "guidance": 3.0, "colour": "x"}))
    assert source_defaults(str(tmp_path)) == {"steps": 12, "guidance": 3.0}
    assert set(source_defaults(str(tmp_path))) <= set(DEFAULTS)
