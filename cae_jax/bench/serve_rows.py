"""The service row: `cae-jax serve` under 1, 4 and 16 concurrent HTTP clients.

A server process serves one bundle; each client holds one keep-alive connection and sends,
in turn, a face crop to TF Serving's `:predict` and a photo to `/v1/score`. One client is
the bundle called one request at a time (serial), the row's peer; more clients let the
server's batcher share model calls. Throughput, p50 and p99 latency per client count (mixed,
and each kind alone at one client and the most), and the server's resident memory after the
first `memory_requests[0]` requests against after `memory_requests[1]` (flat memory: no
per-request leak).
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from cae_jax.bench import report, timing

KINDS = ("face crops to :predict", "photos to /v1/score")  # What `payloads` sends, in order.


def payloads(image_size: int, model_name: str) -> list[tuple[str, bytes, str]]:
    """(path, body, content type): a face crop for :predict and a photo for /v1/score."""
    from skimage import data

    photo = cv2.resize(data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    crop = cv2.resize(photo[40:200, 60:220], (image_size, image_size),
                      interpolation=cv2.INTER_AREA)
    png = cv2.imencode(".png", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))[1].tobytes()
    return [(f"/v1/models/{model_name}:predict",
             json.dumps({"instances": [crop.tolist()]}).encode(), "application/json"),
            ("/v1/score?name=astronaut.png", png, "image/png")]


def start_server(bundle: Path, flags: list[str]) -> tuple[subprocess.Popen, str]:
    """`cae-jax serve` on 127.0.0.1 and a free port, once it is ready."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cae_jax.main", "serve", "--model", str(bundle), "--port", "0",
         *flags], stderr=subprocess.PIPE, text=True)
    before = []  # Lines before the address (warnings, e.g. of an older bundle), kept for errors.
    line = process.stderr.readline()
    while line and " on http://" not in line:
        before.append(line)
        line = process.stderr.readline()
    if not line:
        process.kill()
        raise RuntimeError("cae-jax serve did not start: " + "".join(before))
    url = line.split(" on http://")[1].split(" ")[0]
    for _ in range(600):  # Bounded: compiling the bundle's programs takes seconds.
        try:
            connection = http.client.HTTPConnection(url, timeout=10)
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                return process, url
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("cae-jax serve never became ready")


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux /proc), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def drive(url: str, bodies: list[tuple[str, bytes, str]], clients: int, requests: int) -> dict:
    """`requests` requests spread over `clients` threads, each on its own connection."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        connection = http.client.HTTPConnection(url, timeout=300)
        for k in range(index, requests, clients):
            path, body, kind = bodies[k % len(bodies)]
            start = time.perf_counter()
            connection.request("POST", path, body, {"Content-Type": kind})
            response = connection.getresponse()
            response.read()
            with lock:
                latencies.append(time.perf_counter() - start)
                if response.status != 200:
                    failures.append(f"{path}: {response.status}")
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, first: {failures[0]}")
    return {"clients": clients, "requests": requests, "requests_per_s": requests / seconds,
            "p50_ms": float(np.percentile(latencies, 50) * 1e3),
            "p99_ms": float(np.percentile(latencies, 99) * 1e3)}


def service(bundle: Path, image_size: int, *, clients: tuple[int, ...], requests: int,
            memory_requests: tuple[int, int], flags: list[str]) -> dict:
    """The load rows and the memory row against one server process."""
    name = bundle.name
    bodies = payloads(image_size, name)
    process, url = start_server(bundle, [*flags, "--model-name", name])
    try:
        drive(url, bodies, 1, len(bodies))  # Warm: first detection and both signatures.
        loads = []
        for count in clients:
            timing.log(f"service, {count} clients")
            loads.append(drive(url, bodies, count, requests))
        # Each kind alone, at one client and the most: where the mixed rows' time goes.
        by_kind = {}
        for kind, body in zip(KINDS, bodies, strict=True):
            timing.log(f"service, {kind} alone")
            by_kind[kind] = [drive(url, [body], count, requests)
                             for count in (clients[0], clients[-1])]
        timing.log(f"service memory, {memory_requests[1]} requests")
        drive(url, bodies, max(clients), memory_requests[0])
        memory = {"after": {str(memory_requests[0]): rss_mb(process.pid)}}
        drive(url, bodies, max(clients), memory_requests[1] - memory_requests[0])
        memory["after"][str(memory_requests[1])] = rss_mb(process.pid)
        connection = http.client.HTTPConnection(url, timeout=30)
        connection.request("GET", "/v1/stats")
        stats = json.loads(connection.getresponse().read())
    finally:
        process.terminate()
        process.wait(timeout=120)
    return {"loads": loads, "by_kind": by_kind, "memory_mb": memory, "server_stats": stats}


def load_row(name: str, load: dict, serial: dict, what: str) -> dict:
    return report.row(f"{name}, {load['clients']} HTTP clients", load["requests_per_s"],
                      serial["requests_per_s"], "requests/s",
                      f"vs 1 client (serial); p50 {load['p50_ms']:.0f} ms, "
                      f"p99 {load['p99_ms']:.0f} ms; {what}")


def rows(result: dict) -> list[dict]:
    """Table rows: each client count beside one client (serial), mixed and per kind of
    request; memory after the larger request count beside after the smaller."""
    serial = result["loads"][0]
    out = [load_row("service", load, serial, "face crops to :predict and photos to "
                    "/v1/score in turn") for load in result["loads"]]
    for kind, (one, most) in result["by_kind"].items():
        out.append(load_row(f"service, {kind}", most, one, "this kind of request only"))
    (fewer, few_mb), (more, more_mb) = sorted(result["memory_mb"]["after"].items(),
                                              key=lambda kv: int(kv[0]))
    out.append(report.row(f"service RSS after {more} requests", more_mb, few_mb, "MB",
                          f"vs after {fewer}"))
    return out
