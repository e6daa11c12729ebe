"""`sdonnx serve` under load: images per minute and p50/p95 latency at 1, 4 and 16 concurrent clients, with
batching on and off, one process vs Ray Serve with 2 replicas.

Each configuration is a fresh server (`sdonnx serve ...` as a subprocess on a free loopback port); each client
sends A1111 txt2img requests back to back, the same prompt with its own seeds (so that waiting requests can
share a batched call), for `--seconds` after one warm-up request per client.

    python benchmarks/serve.py                                  # the bundled tiny model, 64x64, 8 steps
    python benchmarks/serve.py --model models/sd15-int8 --size 256 --steps 4 --seconds 120
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).resolve().parent / "results"
SETUPS = {
    "batch": [],
    "no-batch": ["--no-batch"],
    "ray-2-replicas": ["--ray", "--replicas", "2"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: argparse.Namespace, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "sdonnx", "serve", "--port", str(port), "--max-queue", "64", *extra]
    if args.model:
        command += ["--model", str(args.model)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/sdonnx/v1/status", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.5)
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode}: {' '.join(command)}")
    raise SystemExit("server did not come up in 180 s")


def stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, 2)  # SIGINT to its group: Ray's processes stop with it
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, 9)
        server.wait()


def load(url: str, clients: int, seconds: float, body: dict) -> dict:
    """`clients` threads sending requests back to back for `seconds`; latencies of the requests that ended."""
    latencies: list[float] = []
    errors: list[int] = []
    batched: list[int] = []
    lock = threading.Lock()
    window: dict[str, float] = {}
    # the clock starts once every client's warm-up request is answered (with a slow model those queue for a
    # while: a clock started before them timed the warm-ups and left too short a window)
    warm = threading.Barrier(clients, action=lambda: window.update(begin=time.monotonic(),
                                                                   end=time.monotonic() + seconds))

    def client(k: int) -> None:
        with httpx.Client(timeout=600) as http:
            seed = k * 100_000
            http.post(url + "/sdapi/v1/txt2img", json={**body, "seed": seed})  # warm-up, not counted
            warm.wait()
            while time.monotonic() < window["end"]:
                seed += 1
                t = time.monotonic()
                r = http.post(url + "/sdapi/v1/txt2img", json={**body, "seed": seed})
                with lock:
                    if r.status_code == 200:
                        latencies.append(time.monotonic() - t)
                        batched.append(json.loads(r.json()["info"])["batched_with"])
                    else:
                        errors.append(r.status_code)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - window["begin"]
    lat = sorted(latencies)
    return {
        "clients": clients, "requests": len(lat), "errors": errors, "wall_s": round(wall, 2),
        "images_per_min": round(len(lat) / wall * 60, 1),
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None,
        "mean_batched_with": round(statistics.mean(batched), 2) if batched else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="Model folder (default: the bundled tiny model).")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sampler", default="DDIM", help="A deterministic sampler, so requests can batch.")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=20.0, help="Measured time per client count.")
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"Any of {', '.join(SETUPS)}.")
    parser.add_argument("--out", type=Path, help="JSON result (default: results/serve-<model>.json).")
    args = parser.parse_args()
    body = {"prompt": "a lighthouse at dusk", "steps": args.steps, "width": args.size, "height": args.size,
            "sampler_name": args.sampler, "cfg_scale": 7}
    model = args.model.name if args.model else "bundled"
    report = {"command": " ".join(["python", "benchmarks/serve.py", *sys.argv[1:]]), "model": model,
              "request": body, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "python": platform.python_version()},
              "note": "CPU shared with other work while measured: numbers are noisy", "runs": {}}
    for name in args.setups.split(","):
        server, url = start(args, SETUPS[name])
        try:
            runs = []
            for clients in map(int, args.clients.split(",")):
                runs.append(load(url, clients, args.seconds, body))
                print(name, json.dumps(runs[-1]), flush=True)
            report["runs"][name] = runs
        finally:
            stop(server)
    out = args.out or RESULTS / f"serve-{model}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
