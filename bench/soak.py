"""A locust run against `lm serve` with the default model, sampling the server's memory.

Starts `lm serve` (shipped default checkpoint), runs `lm loadtest` headless for the given
users and time, samples the server's resident memory every few seconds, and records
requests, failures and memory at start and end.

    python -m bench.soak --users 100 --run-time 60s --name locust     # issue 4's run
    python -m bench.soak --users 100 --run-time 5m --name soak        # 5-minute soak
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import threading
import time

from bench.common import ROOT, save_result
from bench.serve_bench import free_port, rss_mb, start_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--spawn-rate", type=float, default=20)
    parser.add_argument("--run-time", default="60s")
    parser.add_argument("--name", default="locust")
    parser.add_argument("--checkpoint", default="shakespeare-char-gpt")
    args = parser.parse_args()
    port = free_port()
    server = start_server(args.checkpoint, port, [])
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample_memory():
        start = time.perf_counter()
        while not done.is_set():
            samples.append((round(time.perf_counter() - start, 1), rss_mb(server.pid)))
            done.wait(5.0)

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    out = ROOT / "runs" / args.name
    try:
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "lm",
                "loadtest",
                "--host",
                f"http://127.0.0.1:{port}",
                "--users",
                str(args.users),
                "--spawn-rate",
                str(args.spawn_rate),
                "--run-time",
                args.run_time,
                "--out",
                str(out),
                "--model",
                args.checkpoint,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        print(completed.stdout, completed.stderr, sep="\n")
        health_after = subprocess.run(
            ["curl", "-s", f"http://127.0.0.1:{port}/health"], capture_output=True, text=True
        ).stdout
    finally:
        done.set()
        sampler.join()
        server.terminate()
        server.wait(timeout=60)
    with open(out / "locust_stats.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    total = next(r for r in rows if r["Name"] == "Aggregated")
    endpoints = [
        {
            "name": r["Name"],
            "type": r["Type"],
            "requests": int(r["Request Count"]),
            "failures": int(r["Failure Count"]),
            "p50_ms": float(r["50%"]),
            "p99_ms": float(r["99%"]),
            "rps": float(r["Requests/s"]),
        }
        for r in rows
        if r["Name"] != "Aggregated"
    ]
    result = {
        "command": f"python -m bench.soak --users {args.users} --run-time {args.run_time} "
        f"--name {args.name}",
        "users": args.users,
        "run_time": args.run_time,
        "checkpoint": args.checkpoint,
        "requests": int(total["Request Count"]),
        "failures": int(total["Failure Count"]),
        "rps": float(total["Requests/s"]),
        "endpoints": endpoints,
        "memory_start_mb": samples[0][1] if samples else None,
        "memory_end_mb": samples[-1][1] if samples else None,
        "memory_max_mb": max(m for _, m in samples) if samples else None,
        "memory_samples": samples,
        "health_after": health_after.strip(),
        "loadtest_exit": completed.returncode,
    }
    save_result(args.name, result)
    print({k: v for k, v in result.items() if k not in ("memory_samples", "endpoints")})


if __name__ == "__main__":
    main()
