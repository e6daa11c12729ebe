"""`sdonnx serve`: a real server on a free loopback port, called with the `openai` client and with plain HTTP in
AUTOMATIC1111's request shapes; bad requests, the queue, batching, interrupts and timeouts."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402
import uvicorn  # noqa: E402

from helpers import picture, square_mask  # noqa: E402
from sdonnx import Pipeline  # noqa: E402
from sdonnx.serve.app import ServeConfig, create_app  # noqa: E402
from sdonnx.serve.worker import Worker  # noqa: E402

FAST = {"steps": 2, "width": 64, "height": 64}
SLOW = {"steps": 400, "width": 256, "height": 256, "sampler_name": "DDIM"}  # seconds of work, to be stopped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(pipe: Pipeline, config: ServeConfig | None = None, **worker_options):
    """A uvicorn server on a free loopback port in a thread, stopped (and its worker with it) on exit."""
    worker = Worker(pipe, **worker_options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(worker, config), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", worker
    finally:
        worker.stop()
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load()


@pytest.fixture(scope="module")
def url(pipe):
    with serving(pipe, max_queue=8) as (address, _):
        yield address


def post(url: str, path: str, body, timeout: float = 120, headers: dict | None = None, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={"Content-Type": "application/json", **(headers or {})},
                      timeout=timeout, **kwargs)


def png(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def b64png(img: Image.Image) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def in_background(fn, *args, **kwargs) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, out


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# ---- OpenAI ------------------------------------------------------------------------------------------------------


def test_openai_client_generates_images(url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    result = client.images.generate(prompt="a red circle", n=2, size="64x48", response_format="b64_json",
                                    extra_body={"steps": 2, "seed": 11})
    assert len(result.data) == 2 and result.created > 0
    images = [png(d.b64_json) for d in result.data]
    assert [img.size for img in images] == [(64, 48)] * 2
    assert "Seed: 11" in images[0].info["parameters"] and "Seed: 12" in images[1].info["parameters"]
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_openai_url_format_and_bad_size_are_refused(url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="url"):
        client.images.generate(prompt="x", response_format="url", size="64x64")
    with pytest.raises(openai.BadRequestError, match="multiples of 8"):
        client.images.generate(prompt="x", size="60x64", response_format="b64_json")
    with pytest.raises(openai.BadRequestError, match="size"):
        client.images.generate(prompt="x", size="big", response_format="b64_json")


# ---- AUTOMATIC1111 -------------------------------------------------------------------------------------------


def full_a1111_payload(**changes) -> dict:
    """Every field A1111's txt2img API model has, at its own defaults, as its clients send them."""
    payload = {
        "prompt": "", "negative_prompt": "", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0,
        "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": "Euler", "scheduler": "Automatic",
        "batch_size": 1, "n_iter": 1, "steps": 50, "cfg_scale": 7, "width": 512, "height": 512,
        "restore_faces": False, "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False,
        "eta": 0, "denoising_strength": 0, "s_min_uncond": 0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0,
        "s_noise": 0, "override_settings": {}, "override_settings_restore_afterwards": True,
        "refiner_checkpoint": "", "refiner_switch_at": 0, "disable_extra_networks": False, "firstpass_image": "",
        "comments": {}, "enable_hr": False, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2,
        "hr_upscaler": "", "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
        "hr_checkpoint_name": "", "hr_sampler_name": "", "hr_scheduler": "", "hr_prompt": "",
        "hr_negative_prompt": "", "force_task_id": "", "sampler_index": "Euler", "script_name": "",
        "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {}, "infotext": "",
    }
    return {**payload, **changes}


def test_a1111_full_default_payload(url):
    body = full_a1111_payload(prompt="a cat", negative_prompt="a dog", seed=7, batch_size=2, steps=3, width=64,
                              height=64, cfg_scale=5)
    r = post(url, "/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"images", "parameters", "info"} and isinstance(out["info"], str)
    info = json.loads(out["info"])
    assert info["seed"] == 7 and info["all_seeds"] == [7, 8] and info["ignored"] == []
    assert info["sampler_name"] == "Euler" and info["steps"] == 3 and info["cfg_scale"] == 5
    images = [png(b) for b in out["images"]]
    assert [img.size for img in images] == [(64, 64)] * 2
    assert [img.info["parameters"] for img in images] == info["infotexts"]
    assert "a cat" in info["infotexts"][0] and "a dog" in info["infotexts"][0] and "Seed: 8" in info["infotexts"][1]
    fields = __import__("sdonnx.infotext", fromlist=["parse"]).parse(info["infotexts"][1])  # A1111's infotext
    assert (fields["Sampler"], fields["CFG scale"], fields["Steps"], fields["Size"]) == ("Euler", "5", "3", "64x64")
    assert set(body) <= set(out["parameters"]) and out["parameters"]["seed"] == 7


def test_seed_minus_one_is_drawn_reported_and_reproducible(url):
    first = post(url, "/sdapi/v1/txt2img", {"prompt": "a tree", "seed": -1, **FAST}).json()
    seed = json.loads(first["info"])["seed"]
    assert seed >= 0 and f"Seed: {seed}" in png(first["images"][0]).info["parameters"]
    again = post(url, "/sdapi/v1/txt2img", {"prompt": "a tree", "seed": seed, **FAST}).json()
    assert np.array_equal(np.asarray(png(first["images"][0])), np.asarray(png(again["images"][0])))


def test_unimplemented_fields_are_accepted_and_listed(url):
    body = {"prompt": "x", **FAST, "enable_hr": True, "restore_faces": True, "tiling": False,
            "alwayson_scripts": {"controlnet": {"args": []}}, "some_extension_field": 3,
            "override_settings": {"sd_vae": "other.safetensors"}, "send_images": True}
    r = post(url, "/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    ignored = json.loads(r.json()["info"])["ignored"]
    assert ignored == sorted(["alwayson_scripts", "enable_hr", "restore_faces", "some_extension_field",
                              "override_settings.sd_vae"])


def test_samplers_map_to_schedulers(url):
    names = [s["name"] for s in httpx.get(url + "/sdapi/v1/samplers").json()]
    assert {"Euler a", "Euler", "Heun", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "PLMS", "LCM"} <= set(names)
    for sampler, scheduler, ours in [("DPM++ 2M", "Karras", "dpmpp_2m_karras"), ("DPM++ 2M Karras", None,
                                     "dpmpp_2m_karras"), ("Euler a", None, "euler_a"), ("PLMS", None, "pndm")]:
        body = {"prompt": "x", **FAST, "steps": 4, "sampler_name": sampler,
                **({"scheduler": scheduler} if scheduler else {})}
        info = json.loads(post(url, "/sdapi/v1/txt2img", body).json()["info"])
        assert f"Scheduler: {ours}" in info["infotexts"][0], (sampler, info["infotexts"][0])


def test_models_and_options(url):
    models = httpx.get(url + "/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["tiny"]
    options = httpx.get(url + "/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "tiny"
    assert post(url, "/sdapi/v1/options", {"sd_model_checkpoint": "tiny", "samples_format": "png"}).status_code == 200
    r = post(url, "/sdapi/v1/options", {"sd_model_checkpoint": "sdxl.safetensors"})
    assert r.status_code == 400 and "not loaded" in r.json()["detail"]


def test_img2img_and_inpainting(url):
    src = picture().resize((64, 64))
    body = {"prompt": "x", **FAST, "init_images": [b64png(src)], "denoising_strength": 0.5, "seed": 3}
    r = post(url, "/sdapi/v1/img2img", body)
    assert r.status_code == 200, r.text
    assert png(r.json()["images"][0]).size == (64, 64)
    mask = square_mask().resize((64, 64), Image.Resampling.NEAREST)
    r = post(url, "/sdapi/v1/img2img", {**body, "mask": "data:image/png;base64," + b64png(mask), "inpainting_fill": 1})
    assert r.status_code == 200, r.text
    out = np.asarray(png(r.json()["images"][0]).convert("RGB")).astype(int)
    keep = np.asarray(mask) < 128
    assert np.abs(out[keep] - np.asarray(src).astype(int)[keep]).max() <= 1  # outside the mask: the original
    assert json.loads(r.json()["info"])["is_using_inpainting_conditioning"] is True


BAD = [
    ("/sdapi/v1/txt2img", {"width": 60, "height": 64}, "multiples of 8"),
    ("/sdapi/v1/txt2img", {"sampler_name": "Euler b"}, "unknown sampler"),
    ("/sdapi/v1/txt2img", {"steps": "twenty"}, "steps must be a whole number"),
    ("/sdapi/v1/txt2img", {"steps": 0}, "steps must be between 1 and"),
    ("/sdapi/v1/txt2img", {"steps": 10**9}, "steps must be between 1 and"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "steps": 1e999}', "steps must be a whole number"),  # inf to Python
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "seed": NaN}', "seed must be a whole number"),
    ("/sdapi/v1/txt2img", {"steps": 2, "sampler_name": "PLMS"}, "at least 4 steps"),  # the pipeline's verdict
    ("/sdapi/v1/txt2img", {"cfg_scale": [1]}, "cfg_scale must be a number"),
    ("/sdapi/v1/txt2img", {"batch_size": 100}, "batch_size x n_iter"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x",', "invalid JSON"),
    ("/sdapi/v1/txt2img", b"[1, 2]", "JSON object"),
    ("/sdapi/v1/img2img", {"init_images": ["not base64!"]}, "invalid base64"),
    ("/sdapi/v1/img2img", {"init_images": [base64.b64encode(b"plain text").decode()]}, "not an image"),
    ("/sdapi/v1/img2img", {"init_images": []}, "init_images"),
    ("/v1/images/generations", {"prompt": ""}, "prompt is required"),
    ("/v1/images/generations", {"prompt": "x", "n": 0}, "n must be between"),
    ("/v1/images/generations", b"{oops", "invalid JSON"),
]


def test_bad_requests_get_a_one_line_4xx_and_the_server_keeps_serving(url):
    for path, body, words in BAD:
        if isinstance(body, dict) and path.startswith("/sdapi"):
            body = {**FAST, **body}
        r = post(url, path, body)
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        payload = r.json()
        message = payload["error"]["message"] if path.startswith("/v1/") else payload["detail"]
        assert words in message and "\n" not in message, (body, message)
    assert post(url, "/sdapi/v1/txt2img", {"prompt": "still here", **FAST}).status_code == 200


def test_max_pixels(pipe):
    with serving(pipe, ServeConfig(max_pixels=64 * 64)) as (url, _):
        r = post(url, "/sdapi/v1/txt2img", {**FAST, "width": 128})
        assert r.status_code == 400 and "--max-pixels" in r.json()["detail"]
        assert post(url, "/sdapi/v1/txt2img", FAST).status_code == 200


# ---- load: queue, interrupt, disconnect, timeout, batching ---------------------------------------------------


def test_progress_and_interrupt(pipe):
    with serving(pipe) as (url, worker):
        thread, out = in_background(post, url, "/sdapi/v1/txt2img", {"prompt": "slow", **SLOW})
        wait_until(lambda: worker.progress.step >= 2)
        p = httpx.get(url + "/sdapi/v1/progress").json()
        assert 0 < p["progress"] < 1 and p["eta_relative"] > 0 and p["state"]["sampling_steps"] == SLOW["steps"]
        assert p["current_image"] is None  # the bundled model has no tiny VAE
        started = time.monotonic()
        assert post(url, "/sdapi/v1/interrupt", {}).status_code == 200
        thread.join(timeout=30)
        assert time.monotonic() - started < 10
        r = out[0]
        assert r.status_code == 200 and r.json()["images"] == [] and json.loads(r.json()["info"])["interrupted"]
        assert post(url, "/sdapi/v1/txt2img", FAST).status_code == 200  # the next one runs


def test_queue_full_answers_429_with_retry_after(pipe):
    with serving(pipe, max_queue=1) as (url, worker):
        running, _ = in_background(post, url, "/sdapi/v1/txt2img", SLOW)
        wait_until(worker.busy)
        waiting, waited = in_background(post, url, "/sdapi/v1/txt2img", {"prompt": "second", **FAST})
        wait_until(lambda: worker.queued() == 1)
        r = post(url, "/sdapi/v1/txt2img", FAST)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and "max-queue" in r.json()["detail"]
        openai = post(url, "/v1/images/generations", {"prompt": "x", "size": "64x64"})
        assert openai.status_code == 429 and openai.json()["error"]["type"] == "rate_limit_error"
        worker.interrupt()
        running.join(timeout=30)
        waiting.join(timeout=60)
        assert waited[0].status_code == 200 and len(waited[0].json()["images"]) == 1


def test_a_client_that_leaves_frees_its_place(pipe):
    with serving(pipe, max_queue=1) as (url, worker):
        running, _ = in_background(post, url, "/sdapi/v1/txt2img", SLOW)
        wait_until(worker.busy)
        with pytest.raises(httpx.TimeoutException):  # the client gives up and closes its connection
            post(url, "/sdapi/v1/txt2img", FAST, timeout=1.0)
        wait_until(lambda: worker.queued() == 0, timeout=10)
        waiting, waited = in_background(post, url, "/sdapi/v1/txt2img", FAST)
        wait_until(lambda: worker.queued() == 1)
        worker.interrupt()
        running.join(timeout=30)
        waiting.join(timeout=60)
        assert waited[0].status_code == 200


def test_per_request_timeout(pipe):
    with serving(pipe, ServeConfig(timeout=1.0)) as (url, worker):
        started = time.monotonic()
        r = post(url, "/sdapi/v1/txt2img", SLOW)
        assert r.status_code == 504 and "timed out" in r.json()["detail"]
        assert time.monotonic() - started < 5
        wait_until(lambda: not worker.busy(), timeout=10)  # the abandoned run stops at its next step
        assert post(url, "/sdapi/v1/txt2img", FAST).status_code == 200


def test_waiting_requests_that_differ_only_in_seed_share_one_call(pipe):
    body = {"prompt": "batched", **FAST, "sampler_name": "DDIM"}
    with serving(pipe, max_queue=8) as (url, worker):
        alone = {s: post(url, "/sdapi/v1/txt2img", {**body, "seed": s}).json() for s in (1, 2, 3)}
        running, _ = in_background(post, url, "/sdapi/v1/txt2img", SLOW)
        wait_until(worker.busy)
        threads = [in_background(post, url, "/sdapi/v1/txt2img", {**body, "seed": s}) for s in (1, 2, 3)]
        wait_until(lambda: worker.queued() == 3)
        worker.interrupt()
        for thread, _ in threads:
            thread.join(timeout=60)
        running.join(timeout=30)
    for seed, (_, out) in zip((1, 2, 3), threads):
        result = out[0].json()
        assert json.loads(result["info"])["batched_with"] == 2
        assert json.loads(alone[seed]["info"])["batched_with"] == 0
        same = np.asarray(png(result["images"][0])).astype(int) - np.asarray(png(alone[seed]["images"][0]))
        assert np.abs(same).max() <= 1, seed  # batching changes no picture


def test_no_batching_when_turned_off(pipe):
    body = {"prompt": "unbatched", **FAST, "sampler_name": "DDIM"}
    with serving(pipe, max_queue=8, batching=False) as (url, worker):
        running, _ = in_background(post, url, "/sdapi/v1/txt2img", SLOW)
        wait_until(worker.busy)
        threads = [in_background(post, url, "/sdapi/v1/txt2img", {**body, "seed": s}) for s in (1, 2)]
        wait_until(lambda: worker.queued() == 2)
        worker.interrupt()
        for thread, _ in threads:
            thread.join(timeout=60)
    assert [json.loads(out[0].json()["info"])["batched_with"] for _, out in threads] == [0, 0]


# ---- auth, page, CLI, imports --------------------------------------------------------------------------------


def test_api_key_and_basic_auth(pipe):
    openai = pytest.importorskip("openai")
    with serving(pipe, ServeConfig(api_key="s3cret", api_auth="ann:pw")) as (url, _):
        assert post(url, "/sdapi/v1/txt2img", FAST).status_code == 401
        assert post(url, "/sdapi/v1/txt2img", FAST, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert post(url, "/sdapi/v1/txt2img", FAST, auth=("ann", "pw")).status_code == 200
        assert httpx.get(url + "/sdapi/v1/samplers", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert len(client.images.generate(prompt="x", size="64x64", extra_body={"steps": 1}).data) == 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).images.generate(prompt="x")
        page = httpx.get(url + "/")  # the page itself needs no key (it has a field for it); its data calls do
        assert page.status_code == 200 and 'id="prompt"' in page.text
        assert httpx.get(url + "/sdapi/v1/progress").status_code == 401


def test_request_body_size_is_bounded(pipe, monkeypatch):
    from sdonnx.serve import app as app_module

    monkeypatch.setattr(app_module, "MAX_BODY", 4096)
    with serving(pipe) as (url, _):
        r = post(url, "/sdapi/v1/txt2img", {**FAST, "prompt": "x" * 8192})
        assert r.status_code == 413 and "request body over" in r.json()["detail"]
        assert post(url, "/sdapi/v1/txt2img", FAST).status_code == 200


def test_one_request_of_more_images_than_a_batch_runs_in_several_calls(pipe):
    """batch_size 5 with max_batch 2: three pipeline calls, and each image is the one its seed draws alone."""
    body = {"prompt": "many", **FAST, "sampler_name": "DDIM", "seed": 20}
    with serving(pipe, max_batch=2) as (url, _):
        out = post(url, "/sdapi/v1/txt2img", {**body, "batch_size": 5}).json()
        alone = post(url, "/sdapi/v1/txt2img", {**body, "seed": 24}).json()
    assert json.loads(out["info"])["all_seeds"] == [20, 21, 22, 23, 24] and len(out["images"]) == 5
    assert np.array_equal(np.asarray(png(out["images"][4])), np.asarray(png(alone["images"][0])))


def test_page_and_the_endpoints_its_script_calls(url):
    html = httpx.get(url + "/").text
    for element in ("prompt", "negative_prompt", "width", "height", "steps", "cfg_scale", "sampler_name", "seed",
                    "bar", "preview", "gallery"):
        assert f'id="{element}"' in html, element
    for path in ("/sdapi/v1/progress", "/sdapi/v1/samplers", "/sdonnx/v1/status"):
        assert f'"{path}"' in html and httpx.get(url + path).status_code == 200, path
    status = httpx.get(url + "/sdonnx/v1/status").json()
    assert status["defaults"]["sampler"] in [s["name"] for s in httpx.get(url + "/sdapi/v1/samplers").json()]


def test_serve_without_the_extra_is_one_line():
    script = ("import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
              "from sdonnx.cli import main; main(['serve'])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == ["Error: `sdonnx serve` needs the serve extra (fastapi is not "
                                               "installed): pip install 'sdonnx[serve]'"]


def test_the_runtime_does_not_import_the_web_stack():
    script = ("import sys, sdonnx, sdonnx.cli, sdonnx.serve, sdonnx.serve.worker, sdonnx.serve.a1111\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'uvicorn', 'starlette', 'ray')))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))  # peak RSS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_memory_stays_flat_over_200_requests(tmp_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "sdonnx", "serve", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(url), timeout=60)
        body = {"prompt": "memory", "steps": 1, "width": 64, "height": 64}
        with httpx.Client(timeout=60) as client:
            for k in range(200):
                assert client.post(url + "/sdapi/v1/txt2img", json={**body, "seed": k}).status_code == 200
                if k == 49:
                    warm = peak_rss_kib(server.pid)
        grown = peak_rss_kib(server.pid) - warm
        print(f"peak RSS {warm} KiB after 50 requests, +{grown} KiB after 200")
        assert grown < 20 * 1024, f"peak RSS grew {grown} KiB over 150 requests"
    finally:
        server.terminate()
        server.wait(timeout=30)


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/sdonnx/v1/status", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# ---- live preview and the page in a real browser ----------------------------------------------------------------


@pytest.fixture(scope="module")
def preview_pipe(tmp_path_factory):
    """The bundled model exported again with a random tiny VAE, whose decoder draws the live previews."""
    pytest.importorskip("torch")
    from click.testing import CliRunner

    from sdonnx.export import cli as export_cli

    out = tmp_path_factory.mktemp("serve") / "tiny-preview"
    result = CliRunner().invoke(export_cli.export, ["tiny", str(out), "--tiny-vae", "random", "--quiet"])
    assert result.exit_code == 0, result.output
    return Pipeline.load(out)


def test_progress_carries_the_tiny_vae_preview(preview_pipe):
    with serving(preview_pipe) as (url, worker):
        assert httpx.get(url + "/sdonnx/v1/status").json()["has_preview"] is True
        thread, out = in_background(post, url, "/sdapi/v1/txt2img", SLOW)
        wait_until(lambda: worker.progress.step >= 2)
        p = httpx.get(url + "/sdapi/v1/progress").json()
        preview = png(p["current_image"])
        assert preview.size[0] > 0 and np.asarray(preview).std() > 0  # a picture, not a blank
        assert httpx.get(url + "/sdapi/v1/progress?skip_current_image=true").json()["current_image"] is None
        worker.interrupt()
        thread.join(timeout=30)
        assert out[0].status_code == 200


def _browser(playwright):
    """Playwright's own Chromium, else the distribution's (Debian: chromium-headless-shell or chromium)."""
    import shutil

    try:
        return playwright.chromium.launch()
    except Exception:  # noqa: BLE001 - playwright's browser download is absent: try the system's
        for name in ("chromium-headless-shell", "chromium", "chromium-browser"):
            path = shutil.which(name)
            if path:
                real = "/usr/lib/chromium/chromium-headless-shell" if name == "chromium-headless-shell" else path
                return playwright.chromium.launch(executable_path=real if os.path.exists(real) else path,
                                                  args=["--no-sandbox"])
    pytest.skip("no Chromium for playwright (playwright install chromium, or apt install chromium-headless-shell)")


def test_page_in_headless_chromium(preview_pipe, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with serving(preview_pipe) as (url, worker), sync_api.sync_playwright() as playwright:
        browser = _browser(playwright)
        page = browser.new_page(viewport={"width": 1000, "height": 640})
        errors: list = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('sampler_name').options.length > 0")
        assert page.input_value("#sampler_name") == "DDIM"  # the folder's default, from /sdonnx/v1/status
        page.fill("#prompt", "a lighthouse at dusk")
        page.fill("#negative_prompt", "fog")
        page.fill("#width", "128")
        page.fill("#height", "96")
        page.fill("#steps", "20")
        page.fill("#seed", "42")
        page.select_option("#sampler_name", "Euler")
        assert page.is_hidden("#keyrow")  # no key asked of a server that wants none
        page.click("#generate")
        page.wait_for_selector("figure.result", timeout=60000)
        caption = page.inner_text("figure.result figcaption")
        size = page.evaluate("[document.querySelector('figure.result img').naturalWidth,"
                             " document.querySelector('figure.result img').naturalHeight]")
        page.fill("#steps", "80")
        page.fill("#seed", "-1")
        page.click("#generate")  # a second, long run: the progress bar and the live preview while it runs
        page.wait_for_function("document.getElementById('bar').value > 0.3", timeout=60000)
        page.wait_for_selector("#preview:not([hidden])", timeout=30000)
        page.screenshot(path=str(os.environ.get("SDONNX_PAGE_SCREENSHOT") or tmp_path / "page.png"))
        page.wait_for_function("document.querySelectorAll('figure.result').length == 2", timeout=120000)
        newest = page.inner_text("figure.result figcaption")
        assert page.is_hidden("#preview")
        browser.close()
    assert errors == []
    assert size == [128, 96]
    for words in ("a lighthouse at dusk", "Negative prompt: fog", "Seed: 42", "Scheduler: euler", "Steps: 20"):
        assert words in caption, (words, caption)
    assert "Steps: 80" in newest and "Seed: 42" not in newest


def test_clip_skip_from_override_settings(url):
    """CLIP_stop_at_last_layers reaches the pipeline: reported, and it changes the picture."""
    body = {"prompt": "x", **FAST, "seed": 1, "override_settings": {"CLIP_stop_at_last_layers": 1}}
    one = post(url, "/sdapi/v1/txt2img", body).json()
    two = post(url, "/sdapi/v1/txt2img", {**body, "override_settings": {"CLIP_stop_at_last_layers": 2}}).json()
    infos = [json.loads(r["info"]) for r in (one, two)]
    assert [i["clip_skip"] for i in infos] == [1, 2] and infos[1]["ignored"] == []
    assert "Clip skip: 2" in infos[1]["infotexts"][0]
    assert one["images"][0] != two["images"][0]
    bad = post(url, "/sdapi/v1/txt2img", {**body, "override_settings": {"CLIP_stop_at_last_layers": 0}})
    assert bad.status_code == 400 and "at least 1" in bad.json()["detail"]
