"""The runtime generates images without ever importing torch, transformers or diffusers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_pipeline import tiny_folders

SCRIPT = """
import json, sys
import sdonnx
pipe = sdonnx.Pipeline.load(sys.argv[1])
images = pipe.txt2img("a red circle", negative_prompt="blue", steps=2, seed=0, width=32, height=32)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "diffusers", "optimum"))
print(json.dumps({"size": list(images[0].size), "heavy": heavy}))
"""


def test_generating_imports_no_torch(tmp_path_factory):
    _, folder = tiny_folders("sd1", tmp_path_factory.getbasetemp())
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(folder)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"size": [32, 32], "heavy": []}
