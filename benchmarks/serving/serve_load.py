"""Serving under load: `cnnkit serve` with dynamic batching against the same server answering each
request with its own forward pass (--max-batch 1, the naive one-request-one-forward server), in one
run: p50/p99 latency and throughput at 1, 8 and 64 concurrent clients, medians of --repeats.

    python -m benchmarks.serving.serve_load [--model FILE] [--repeats 3] [--requests 1500]

Without --model it trains the MNIST fast recipe for one epoch first (about 10 s) and serves that.
Clients send MNIST test digits as PNG bodies over keep-alive HTTP/1.1 connections from this process
(asyncio, no HTTP library: a client library's own overhead would be measured instead of the
server's). The server and the clients share the machine's cores, as they would on one box.

The client (`load`) is also what tests/test_serve.py's load test uses.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.common import SHARED_DATA, cnnkit_command, cnnkit_train, machine_header

EARLY_ANSWER_BYTES = 1 << 20  # bodies above this wait briefly for an early answer (a 413) before sending


async def request(host: str, port: int, conn: list, method: str, path: str, body: bytes, content_type: str,
                  timeout: float) -> tuple[int, bytes]:
    """One request on the connection in conn[0] (opened or re-opened as needed): (status, body)."""
    if conn[0] is None:
        conn[0] = await asyncio.open_connection(host, port)
    reader, writer = conn[0]
    head = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    try:
        writer.write(head)
        if len(body) > EARLY_ANSWER_BYTES:  # as `Expect: 100-continue` would: a refusal arrives before the body
            await writer.drain()
            try:
                line = await asyncio.wait_for(reader.readline(), 0.5)
            except asyncio.TimeoutError:
                line = b""
            if line:
                return await read_response(line, reader, conn)
        writer.write(body)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        return await read_response(line, reader, conn)
    except (ConnectionError, asyncio.IncompleteReadError):
        conn[0] = None
        writer.close()
        return 0, b"connection lost"


async def read_response(status_line: bytes, reader, conn: list) -> tuple[int, bytes]:
    status = int(status_line.split()[1])
    length, close = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "connection" and "close" in value.lower():
            close = True
    data = await reader.readexactly(length)
    if close:
        conn[0][1].close()
        conn[0] = None
    return status, data


async def load(host: str, port: int, jobs: list[tuple[str, bytes, str]], concurrency: int,
               timeout: float = 30.0) -> list[tuple[int, float, bytes]]:
    """Send jobs [(path, body, content type)] with `concurrency` connections; per job, in order:
    (status, seconds, response body)."""
    results: list = [None] * len(jobs)
    queue: asyncio.Queue = asyncio.Queue()
    for i, job in enumerate(jobs):
        queue.put_nowait((i, job))

    async def client():
        conn = [None]
        while not queue.empty():
            i, (path, body, kind) = queue.get_nowait()
            start = time.perf_counter()
            status, data = await request(host, port, conn, "POST", path, body, kind, timeout)
            results[i] = (status, time.perf_counter() - start, data)
        if conn[0] is not None:
            conn[0][1].close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


# ----------------------------------------------------------------------------- the benchmark
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, extra: list[str] | None = None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(cnnkit_command("serve", model, "--port", str(port), "--max-batch", str(max_batch),
                                           *(extra or [])), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("the server exited at start") from None
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start in 60 s")


def digit_pngs(n: int) -> list[bytes]:
    import cnnkit
    from PIL import Image
    ds = cnnkit.load_dataset("mnist", data_dir=str(SHARED_DATA), quiet=True)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(ds.test.images[i, 0].numpy()).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def measure(port: int, pngs: list[bytes], concurrency: int, requests: int) -> dict:
    jobs = [("/predict?top_k=1", pngs[i % len(pngs)], "image/png") for i in range(requests)]
    start = time.perf_counter()
    results = asyncio.run(load("127.0.0.1", port, jobs, concurrency))
    seconds = time.perf_counter() - start
    latencies = sorted(r[1] for r in results)
    bad = sum(r[0] != 200 for r in results)
    return {"requests_per_second": requests / seconds, "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, "errors": bad}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model file (default: train the MNIST fast recipe for 1 epoch)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=1500,
                    help="requests per measurement at 8 and 64 clients (1 client: a third)")
    ap.add_argument("--runtime", default="auto")
    ap.add_argument("--max-batch", type=int, default=32, help="the batched server's --max-batch")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = args.model
    if model is None:
        tmp = tempfile.mkdtemp(prefix="cnnkit-serve-bench-")
        cnnkit_train(["--recipe", "fast", "--data", "mnist", "--data-dir", str(SHARED_DATA), "--epochs", "1"],
                     Path(tmp) / "run")
        model = f"{tmp}/run"
    pngs = digit_pngs(500)
    servers = {"batched": args.max_batch, "naive": 1}
    table: dict = {name: {c: [] for c in (1, 8, 64)} for name in servers}
    for _ in range(args.repeats):
        for name, max_batch in servers.items():  # interleaved: drift of the machine hits both alike
            proc, port = start_server(model, max_batch, ["--runtime", args.runtime])
            try:
                measure(port, pngs, 8, 200)  # warm-up: first requests, thread pools, allocator
                for c in (1, 8, 64):
                    table[name][c].append(measure(port, pngs, c, args.requests // 3 if c == 1 else args.requests))
            finally:
                proc.terminate()
                proc.wait(10)
    summary = {name: {c: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for c, runs in rows.items()}
               for name, rows in table.items()}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"model {model}; runtime {args.runtime}; batched: --max-batch {args.max_batch}, naive: --max-batch 1; "
          f"medians of {args.repeats}; {os.cpu_count()} CPUs")
    print(f"{'clients':>7} | {'batched req/s':>13} {'p50 ms':>7} {'p99 ms':>7} | {'naive req/s':>11} {'p50 ms':>7} "
          f"{'p99 ms':>7} | ratio")
    for c in (1, 8, 64):
        b, n = summary["batched"][c], summary["naive"][c]
        print(f"{c:>7} | {b['requests_per_second']:>13,.0f} {b['p50_ms']:>7.1f} {b['p99_ms']:>7.1f} | "
              f"{n['requests_per_second']:>11,.0f} {n['p50_ms']:>7.1f} {n['p99_ms']:>7.1f} | "
              f"{b['requests_per_second'] / n['requests_per_second']:.2f}x")
        if b["errors"] or n["errors"]:
            print(f"        errors: batched {b['errors']}, naive {n['errors']}")


if __name__ == "__main__":
    machine_header()
    main()
