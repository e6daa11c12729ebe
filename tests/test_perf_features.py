"""Performance features on tiny models: the step cache (DeepCache), low-memory mode with tiled VAE decoding,
and the text-encoding cache. Speed itself is measured by the benchmarks, not here."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

import tiny_sd
from helpers import cli_error, one_line_error
from sdonnx.errors import SdonnxError
from sdonnx.export import cli as export_cli
from sdonnx.export.models.config import UNetConfig
from sdonnx.export.models.unet import UNet2DConditionModel
from sdonnx.pipeline import Pipeline
from sdonnx.tiling import Tiles, decode_tiled, feather

PROMPT, NEGATIVE = "a red circle on a blue background", "green square"
GEN = dict(negative_prompt=NEGATIVE, steps=7, scheduler="euler", seed=3, output_type="np")


@pytest.fixture(scope="session")
def source(tmp_path_factory):
    """(diffusers pipeline, its folder): tiny random sd1 weights."""
    root = tmp_path_factory.mktemp("perf-src")
    pipe = tiny_sd.make_pipeline("sd1", seed=2)
    pipe.save_pretrained(root / "sd1")
    return pipe, root / "sd1"


@pytest.fixture(scope="session")
def exported(source, tmp_path_factory):
    """precision -> folder exported with --step-cache, once per session."""
    root = tmp_path_factory.mktemp("perf-out")
    cache: dict = {}

    def get(precision: str = "fp32", step_cache: bool = True) -> Path:
        key = (precision, step_cache)
        if key not in cache:
            out = root / f"{precision}-{'cache' if step_cache else 'plain'}"
            args = [str(source[1]), str(out), "--precision", precision, "--quiet"]
            result = CliRunner().invoke(export_cli.export, args + (["--step-cache"] if step_cache else []))
            assert result.exit_code == 0, result.output
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def pipe(exported):
    return Pipeline.load(exported("fp32"), threads=1)


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class Counted:
    """A component wrapper that counts its calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, **feeds):
        self.calls += 1
        return self.inner(**feeds)


# ---- the U-Net split in PyTorch ------------------------------------------------------------------

@pytest.mark.parametrize("layers", [1, 2])
def test_unet_split_reproduces_the_full_pass(layers):
    torch.manual_seed(0)
    cfg = dict(tiny_sd.unet_config("sd2"), layers_per_block=layers)
    unet = UNet2DConditionModel(UNetConfig.from_dict(cfg)).eval()
    for p in unet.parameters():  # diffusers zero-initialises some layers; random ones make the check bite
        torch.nn.init.normal_(p, std=0.1)
    sample, text = torch.randn(2, 4, 8, 12), torch.randn(2, 77, cfg["cross_attention_dim"])
    with torch.no_grad():
        full = unet(sample, 300.0, text)
        assert full.abs().max() > 1e-2
        for depth in range(layers + 1):
            out, deep = unet.forward_with_features(sample, 300.0, text, depth)
            assert torch.equal(out, full)
            assert deep.shape[-2:] == sample.shape[-2:]  # the deep features live at the latent resolution
            torch.testing.assert_close(unet.forward_shallow(sample, 300.0, text, deep, depth), full, rtol=0,
                                       atol=1e-6)
            # other features give another output: the shallow branch really reads them
            assert not torch.allclose(unet.forward_shallow(sample, 300.0, text, deep * 0.5, depth), full)
    with pytest.raises(ValueError, match="depth must be in 0..%d" % layers):
        unet.forward_shallow(sample, 300.0, text, deep, layers + 1)


# ---- the exported graphs -------------------------------------------------------------------------

def test_step_cache_export(exported, source):
    out = exported("fp32")
    meta = json.loads((out / "sdonnx.json").read_text())
    plain = session(out / "unet" / "model.onnx")
    features = session(out / "unet" / "model_features.onnx")
    shallow = session(out / "unet_shallow" / "model.onnx")
    # optimum's signature stays; the features graph adds one output; the shallow graph one input
    assert [o.name for o in plain.get_outputs()] == ["out_sample"]
    assert [o.name for o in features.get_outputs()] == ["out_sample", "deep_features"]
    assert [i.name for i in shallow.get_inputs()] == ["sample", "timestep", "encoder_hidden_states", "deep_features"]
    # the two U-Net graphs read one weights file: no big tensor inside either graph file
    for name in ("model.onnx", "model_features.onnx"):
        graph = onnx.load(str(out / "unet" / name), load_external_data=False).graph
        assert max(len(t.raw_data) for t in graph.initializer) <= 1024
    data = (out / "unet" / "model.onnx_data").stat().st_size
    assert (out / "unet" / "model_features.onnx").stat().st_size < 0.2 * data
    assert meta["step_cache"]["depth"] == 1 and meta["step_cache"]["full_graph"] == "unet/model_features.onnx"
    assert meta["step_cache"]["deep_features_verify"]["max_abs_err"] < 1e-4
    assert meta["components"]["unet_shallow"]["verify"]["max_abs_err"] < 1e-4
    assert {"unet/model_features.onnx", "unet_shallow/model.onnx"} <= set(meta["files"])

    # chained: the shallow graph fed the full pass's deep features gives diffusers' prediction
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 8, 12), dtype=np.float32)
    text = rng.standard_normal((2, 77, 32), dtype=np.float32)
    feeds = {"sample": sample, "timestep": np.array(501.0, np.float32), "encoder_hidden_states": text}
    with torch.no_grad():
        want = source[0].unet(torch.from_numpy(sample), 501.0, torch.from_numpy(text)).sample.numpy()
    out_sample, deep = features.run(None, feeds)
    np.testing.assert_array_equal(out_sample, plain.run(None, feeds)[0])
    got = shallow.run(None, {**feeds, "deep_features": deep})[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out_sample, want, atol=1e-4, rtol=0)


def test_step_cache_graphs_are_quantized_too(exported):
    out = exported("int8")
    meta = json.loads((out / "sdonnx.json").read_text())
    info = meta["components"]["unet_shallow"]
    assert info["precision"] == "int8" and info["verify"]["psnr"] > 30
    assert info["ops"].get("MatMulInteger", 0) + info["ops"].get("com.microsoft.DynamicQuantizeMatMul", 0) > 0
    assert meta["step_cache"]["deep_features_verify"]["psnr"] > 30
    ops = {n.op_type for n in onnx.load(str(out / "unet" / "model_features.onnx"), load_external_data=False).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}  # the features graph is the quantized U-Net
    pipe = Pipeline.load(out, threads=1)
    a = pipe.txt2img(PROMPT, **GEN)
    b = pipe.txt2img(PROMPT, cache_interval=2, **GEN)
    assert np.isfinite(b).all() and np.abs(a - b).mean() < 0.05


def test_optimum_runs_a_step_cache_folder(exported, source):
    """The extra graphs leave optimum's layout intact (an extra U-Net output would not: optimum's pipeline
    takes the U-Net's first output after moving out_sample last, which is why the features graph is separate)."""
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    ours = ORTStableDiffusionPipeline.from_pretrained(exported("fp32"))
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=2, height=32, width=32, guidance_scale=7.5, output_type="np")
    got = ours("a red circle", latents=latents, **kwargs).images
    want = source[0]("a red circle", latents=latents, **kwargs).images
    np.testing.assert_allclose(got, want, atol=2e-3)


# ---- the step cache at run time ------------------------------------------------------------------

def test_cache_interval_one_is_exactly_uncached_and_k_calls_full_every_kth(pipe):
    plain = pipe.txt2img(PROMPT, **GEN)
    assert np.array_equal(pipe.txt2img(PROMPT, cache_interval=1, **GEN), plain)
    for k, full_steps in ((2, 4), (3, 3)):  # 7 steps: full at 0, 2, 4, 6 / at 0, 3, 6
        pipe.components.pop("unet_features", None), pipe.components.pop("unet_shallow", None)
        cached = pipe.txt2img(PROMPT, cache_interval=k, **GEN)  # opens the step-cache graphs
        counters = {n: Counted(pipe.components[n]) for n in ("unet", "unet_features", "unet_shallow")}
        pipe.components.update(counters)
        try:
            again = pipe.txt2img(PROMPT, cache_interval=k, **GEN)
        finally:
            pipe.components.update({n: c.inner for n, c in counters.items()})
        assert np.array_equal(again, cached)
        assert (counters["unet_features"].calls, counters["unet_shallow"].calls) == (full_steps, 7 - full_steps)
        assert counters["unet"].calls == 0
        diff = np.abs(cached - plain)
        assert 0 < diff.max() < 0.06 and diff.mean() < 0.01, (k, diff.max(), diff.mean())


def test_cache_interval_in_img2img_and_inpaint(pipe):
    rng = np.random.default_rng(0)
    image = (rng.uniform(0, 1, (32, 32, 3)) * 255).astype(np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    from PIL import Image

    img, msk = Image.fromarray(image), Image.fromarray(mask)
    for run in (lambda **kw: pipe.img2img(PROMPT, img, strength=0.7, **kw),
                lambda **kw: pipe.inpaint(PROMPT, img, msk, **kw)):
        plain, cached = run(**GEN), run(cache_interval=2, **GEN)
        assert np.array_equal(run(cache_interval=1, **GEN), plain)
        assert np.abs(cached - plain).mean() < 0.02


def test_cache_interval_errors(exported):
    plain = Pipeline.load(exported("fp32", step_cache=False), threads=1)
    one_line_error(lambda: plain.txt2img(PROMPT, cache_interval=2, **GEN), "--step-cache")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(SdonnxError, match="cache_interval"):
            plain.txt2img(PROMPT, cache_interval=bad, **GEN)


# ---- low-memory mode and tiled decoding ----------------------------------------------------------

def test_low_memory_gives_the_same_image(exported, pipe):
    low = Pipeline.load(exported("fp32"), low_memory=True, threads=1)
    assert not low.components and not low.config.cpu_arena and not low.config.mem_pattern
    opened = []
    real = low._using

    def spy(name):
        opened.append(name)
        return real(name)

    low._using = spy
    assert np.array_equal(low.txt2img(PROMPT, **GEN), pipe.txt2img(PROMPT, **GEN))  # 32 px: one tile
    assert opened == ["text_encoder", "unet", "vae_decoder"] and not low.components  # each opened once, closed
    assert np.array_equal(low.txt2img(PROMPT, cache_interval=2, **GEN), pipe.txt2img(PROMPT, cache_interval=2, **GEN))


def test_closed_component_refuses_to_run(exported):
    from sdonnx.session import Component

    c = Component(exported("fp32") / "vae_decoder" / "model.onnx")
    c.close()
    with pytest.raises(SdonnxError, match="closed"):
        c(latent_sample=np.zeros((1, 4, 4, 4), np.float32))


def test_tiled_decoding_stays_close_to_untiled(pipe):
    """Tolerance: with 8-latent tiles overlapping by 4 on a 20x24 latent grid, the tiny random VAE's pixels stay
    within 0.2 (max) and 0.04 (mean) of untiled decoding in [0, 1] units; each tile normalises and attends
    over itself only, which is where the difference comes from (the blend itself is exact, next test)."""
    latents = np.random.default_rng(1).standard_normal((1, 4, 20, 24), dtype=np.float32)
    untiled = pipe._decode(latents)
    pipe.tiles = Tiles(8, 4)
    try:
        tiled = pipe._decode(latents)
    finally:
        pipe.tiles = None
    diff = np.abs(tiled - untiled)
    assert tiled.shape == untiled.shape == (1, 40, 48, 3)
    assert diff.max() < 0.2 and diff.mean() < 0.04, (diff.max(), diff.mean())


def test_tile_blending_is_seamless_for_a_local_decoder():
    """A decoder that maps each latent pixel to its own 2x2 block: tiling must give back exactly the same."""
    def decode(z):
        return np.tanh(z[:, :3]).repeat(2, axis=2).repeat(2, axis=3)

    latents = np.random.default_rng(0).standard_normal((2, 4, 23, 17), dtype=np.float32)
    for tiles in (Tiles(8, 4), Tiles(5, 0), Tiles(16, 7), Tiles(40, 16)):
        np.testing.assert_allclose(decode_tiled(decode, latents, tiles, 2), decode(latents), atol=1e-6, rtol=0)
    assert Tiles(40, 16).starts(64) == [0, 24] and Tiles(8, 4).starts(8) == [0]
    assert Tiles(8, 4).starts(23) == [0, 4, 8, 12, 15]
    w = feather(8, 4, lead=True, trail=False)
    assert np.all(np.diff(w[:4]) > 0) and np.all(w[4:] == 1) and w[0] > 0
    with pytest.raises(SdonnxError, match="overlap"):
        Tiles(8, 8)


# ---- the text-encoding cache ---------------------------------------------------------------------

def test_text_encodings_are_cached(exported, pipe):
    fresh = Pipeline.load(exported("fp32"), threads=1)
    counter = Counted(fresh.components["text_encoder"])
    fresh.components["text_encoder"] = counter
    first = fresh.txt2img(PROMPT, **GEN)
    assert counter.calls == 2  # prompt and negative prompt
    fresh.txt2img(PROMPT, **dict(GEN, seed=4, num_images=2))
    assert counter.calls == 2
    assert np.array_equal(fresh.txt2img(PROMPT, **GEN), first)
    fresh.txt2img("a photo of a cat", **GEN)
    assert counter.calls == 3  # only the new prompt
    fresh.txt2img("a photo of a cat", **dict(GEN, guidance=1.0))
    assert counter.calls == 3
    for i in range(12):  # the cache stays small
        fresh._encode_texts([f"{i} cat"])
    assert len(fresh._texts) <= 8
    before = counter.calls
    fresh.forget_prompts()  # what the benchmark worker does before each timed generation
    assert np.array_equal(fresh.txt2img(PROMPT, **GEN), first) and counter.calls == before + 2


# ---- the command line ----------------------------------------------------------------------------

def test_generate_options(exported, tmp_path):
    from sdonnx.cli import main

    folder = exported("fp32")
    for extra in (["--cache-interval", "2"], ["--low-memory"]):
        out = tmp_path / f"{extra[0][2:]}.png"
        result = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(folder), "--steps", "3",
                                           "--seed", "1", "-o", str(out), *extra])
        assert result.exit_code == 0, result.output
        assert out.is_file()
    result = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(exported("fp32", step_cache=False)),
                                       "--steps", "2", "--cache-interval", "3", "-o", str(tmp_path / "x.png")])
    cli_error(result, "--step-cache")
    assert not (tmp_path / "x.png").exists()


# ---- memory-efficient attention (export option) --------------------------------------------------

def test_mha_attention_export_matches_diffusers(tmp_path):
    """--attention mha: the U-Net's attention becomes ORT's MultiHeadAttention (sd2: per-block heads, upcast,
    linear projections), within 1e-4 of diffusers in fp32."""
    ref = tiny_sd.make_pipeline("sd2", seed=5)
    ref.save_pretrained(tmp_path / "src")
    out = tmp_path / "mha"
    result = CliRunner().invoke(export_cli.export, [str(tmp_path / "src"), str(out), "--attention", "mha",
                                                    "--step-cache", "--quiet"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "sdonnx.json").read_text())
    assert meta["export_report"]["attention"] == "mha"
    for graph in ("unet/model.onnx", "unet_shallow/model.onnx"):
        ops = [n.op_type for n in onnx.load(str(out / graph), load_external_data=False).graph.node]
        assert ops.count("MultiHeadAttention") > 0 and "Softmax" not in ops, graph
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 8, 12), dtype=np.float32)
    text = rng.standard_normal((2, 77, ref.unet.config.cross_attention_dim), dtype=np.float32)
    with torch.no_grad():
        want = ref.unet(torch.from_numpy(sample), 501.0, torch.from_numpy(text)).sample.numpy()
    feeds = {"sample": sample, "timestep": np.array(501.0, np.float32), "encoder_hidden_states": text}
    np.testing.assert_allclose(session(out / "unet" / "model.onnx").run(None, feeds)[0], want, atol=1e-4, rtol=0)
    fp16 = CliRunner().invoke(export_cli.export, [str(tmp_path / "src"), str(tmp_path / "x"), "--attention", "mha",
                                                  "--precision", "fp16", "--quiet"])
    assert fp16.exit_code == 1 and "fp32 or int8" in fp16.output and not (tmp_path / "x").exists()


FLASH_PROBE = """
import sys, numpy as np, onnxruntime as ort
from onnx import helper, TensorProto
S, D = 4096, 64
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, S, D])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, S, D])
if sys.argv[1] == "mha":
    nodes = [helper.make_node("MultiHeadAttention", ["x", "x", "x"], ["y"], domain="com.microsoft", num_heads=2)]
else:
    nodes = [helper.make_node("Transpose", ["x"], ["kt"], perm=[0, 2, 1]), helper.make_node("MatMul", ["x", "kt"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "x"], ["y"])]
model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
so = ort.SessionOptions()
so.intra_op_num_threads, so.enable_cpu_mem_arena, so.enable_mem_pattern = 1, False, False
s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
feed = {"x": np.random.default_rng(0).standard_normal((1, S, D), dtype=np.float32)}


def peak_mib():  # VmHWM: this process's own peak (ru_maxrss would carry the forking parent's)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


before = peak_mib()
s.run(None, feed)
print(peak_mib() - before)
"""


def test_cpu_multihead_attention_never_holds_the_score_matrix():
    """Peak memory of one attention over 4096 tokens: the [S, S] fp32 scores alone are 64 MiB."""
    import subprocess
    import sys

    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux /proc for peak memory")

    def growth(kind: str) -> float:
        done = subprocess.run([sys.executable, "-c", FLASH_PROBE, kind], capture_output=True, text=True, check=True)
        return float(done.stdout.strip())

    assert growth("plain") > 60  # the probe can see the score matrix
    assert growth("mha") < 20

HEAP_CHURN = """
import sys, numpy as np
from sdonnx.system import return_freed_memory
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
np.ones(48 << 20, np.uint8)  # freeing a mapped 48 MiB block raises glibc's dynamic mmap threshold to 32 MiB
if sys.argv[1] == "pin":
    assert return_freed_memory()
before = rss_mb()
keep = []
for _ in range(8):
    big = np.ones(24 << 20, np.uint8)  # 24 MiB: from the heap once the threshold has grown
    keep.append(np.ones(200_000, np.uint8))  # a small survivor above it fragments the heap
    del big
print(rss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="the allocator setting is glibc's")
def test_low_memory_returns_freed_buffers_to_the_system():
    """Low-memory mode pins glibc's mmap threshold, so freed large buffers leave the resident set at once."""
    def retained(mode: str) -> float:
        done = subprocess.run([sys.executable, "-c", HEAP_CHURN, mode], capture_output=True, text=True, check=True)
        return float(done.stdout)

    assert retained("default") > 16  # the heap keeps a freed 24 MiB buffer (what the setting is for)
    assert retained("pin") < 8
