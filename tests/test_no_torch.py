"""The runtime never imports torch, transformers or diffusers: not on import of any of its modules, not while it
generates an image."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import tiny_folders

SCRIPT = """
import importlib, json, pkgutil, sys
import sdonnx
modules = sorted(m.name for m in pkgutil.iter_modules(sdonnx.__path__) if m.name != "export")
for name in modules:
    importlib.import_module("sdonnx." + name)
pipe = sdonnx.Pipeline.load(sys.argv[1])
images = pipe.txt2img("a red circle", negative_prompt="blue", steps=2, seed=0, width=32, height=32)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "diffusers", "optimum"))
print(json.dumps({"modules": modules, "size": list(images[0].size), "heavy": heavy}))
"""


def test_runtime_imports_no_torch(tmp_path_factory):
    _, folder = tiny_folders("sd1", tmp_path_factory.getbasetemp())
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(folder)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"cli", "pipeline", "schedulers", "session", "tokenizer"} <= set(result.pop("modules"))
    assert result == {"size": [32, 32], "heavy": []}
