"""Load test of `medmoe serve` on 127.0.0.1: throughput, latency percentiles, 503s, exactly-once.

Starts the server as a subprocess (`medmoe serve --config <generated yaml>`), sends a bounded number
of POST /v1/answer requests (questions from the bundled `dental` test split) at each concurrency,
then checks every accepted request was answered exactly once: each 200 echoes its own request_id,
no id is answered twice, and the server's batcher ledger (/metrics) counts as many answers as the
client received, with no duplicates, timeouts or failures.

Each level stops at --requests requests or --level-seconds seconds, whichever comes first (the
report shows how many were sent). The c=16 / c=1 throughput ratio is measured again in --rounds
alternating rounds (c=1, c=16, c=1, c=16, ...) and its median quoted, as docs/benchmarks.md asks.

    PYTHONPATH=src python benchmarks/serve_load.py --model smollm2-135m --workload open
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--workload", choices=["options", "open"], default="open", help="option questions (scoring) or open ones (generation)")
    p.add_argument("--requests", type=int, default=500, help="requests per concurrency level (at most)")
    p.add_argument("--level-seconds", type=float, default=150, help="time limit per level")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--rounds", type=int, default=3, help="alternating c=1 / c=16 rounds for the ratio")
    p.add_argument("--round-seconds", type=float, default=60)
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=10)
    p.add_argument("--max-queue", type=int, default=48, help="below 64, so c=64 exercises 503s")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=300, help="server request timeout (s)")
    p.add_argument("--out", default="reports/serve_load")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def questions(workload: str) -> list[dict]:
    from medmoe.data import load_dataset

    records = load_dataset("dental", "test")
    if workload == "options":
        return [{"question": r.question, "options": list(r.options)} for r in records]
    return [{"question": r.question} for r in records]


def start_server(args: argparse.Namespace, folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = {"model": args.model, "host": "127.0.0.1", "port": port, "threads": args.threads,
              "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms, "max_queue": args.max_queue,
              "request_timeout_s": args.timeout, "max_new_tokens": args.max_new_tokens}
    (folder / "serve.yaml").write_text(yaml.safe_dump(config))
    log = folder / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-c", "from medmoe.cli import main; main()", "serve", "--config", str(folder / "serve.yaml")]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.send_signal(signal.SIGINT)
    raise SystemExit("server did not become healthy in 600 s")


def ledger(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'medmoe_batcher_requests\{outcome="(\w+)"\} (\S+)', text)}


async def run_level(base: str, bodies: list[dict], concurrency: int, max_requests: int, seconds: float, tag: str) -> dict:
    """`concurrency` clients send requests back to back until max_requests are sent or time is up."""
    sent, latencies, statuses, answered_ids, mismatched = 0, [], {}, [], 0
    start = time.perf_counter()
    stop_at = start + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent, mismatched
        while sent < max_requests and time.perf_counter() < stop_at:
            i = sent
            sent += 1
            rid = f"{tag}-{i}"
            t0 = time.perf_counter()
            r = await http.post("/v1/answer", json={**bodies[i % len(bodies)], "request_id": rid})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                latencies.append((time.perf_counter() - t0) * 1000)
                answered_ids.append(r.json()["request_id"])
                mismatched += r.json()["request_id"] != rid
            elif r.status_code == 503:
                await asyncio.sleep(min(float(r.headers.get("Retry-After", 1)), 0.5))  # back off, bounded

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    ok = statuses.get(200, 0)
    pct = (lambda q: float(np.percentile(latencies, q))) if latencies else (lambda q: float("nan"))
    return {
        "concurrency": concurrency, "tag": tag, "sent": sent, "answered": ok, "status_503": statuses.get(503, 0),
        "other_errors": sum(v for k, v in statuses.items() if k not in (200, 503)), "statuses": statuses,
        "seconds": elapsed, "throughput_rps": ok / elapsed, "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
        "duplicate_ids": len(answered_ids) - len(set(answered_ids)), "mismatched_ids": mismatched,
        "stopped_by": "requests" if sent >= max_requests else "time",
    }


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "device": "cpu", "load_average_at_start": os.getloadavg()}


def write_report(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    cfg, m, once = result["config"], result["machine"], result["exactly_once"]
    lines = [
        f"# Serving load test: {cfg['model']}, {cfg['workload']} questions",
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}  ",
        f"Machine: {m['cpu']}, {m['cores']} cores shared with other jobs (load average {m['load_average_at_start'][0]:.1f} at start, "
        f"{result['load_average_at_end'][0]:.1f} at end), torch {m['torch']}, CPU only, server torch threads {cfg['threads']}  ",
        f"Server: max_batch_size {cfg['max_batch_size']}, max_wait_ms {cfg['max_wait_ms']:g}, max_queue {cfg['max_queue']}, "
        f"request timeout {cfg['timeout']:g} s, max_new_tokens {cfg['max_new_tokens']}; questions from the bundled dental test split; "
        f"traffic to 127.0.0.1 only.  ",
        f"Each level stops at {cfg['requests']} requests or {cfg['level_seconds']:g} s, whichever comes first; a client that gets "
        "503 waits min(Retry-After, 0.5 s) and sends its next request (a refused request is not re-sent).",
        "",
        "| concurrency | sent | answered | 503 | other errors | throughput (req/s) | p50 (ms) | p95 (ms) | p99 (ms) | stopped by |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for lv in result["levels"]:
        lines.append(f"| {lv['concurrency']} | {lv['sent']} | {lv['answered']} | {lv['status_503']} | {lv['other_errors']} | "
                     f"{lv['throughput_rps']:.2f} | {lv['p50_ms']:.0f} | {lv['p95_ms']:.0f} | {lv['p99_ms']:.0f} | {lv['stopped_by']} |")
    r = result["ratio"]
    lines += [
        "",
        f"**Throughput ratio c=16 / c=1**: {r['median']:.2f}x, median of {len(r['per_round'])} alternating rounds of "
        f"{cfg['round_seconds']:g} s per side ({', '.join(f'{x:.2f}' for x in r['per_round'])}); target >= 2x: "
        f"**{'met' if r['median'] >= 2 else 'not met'}**. The table's single pass gives {result['table_ratio']:.2f}x.",
        "",
        "**Exactly once**: " + ("every accepted request was answered exactly once" if once["ok"] else "FAILED")
        + f" (client: {once['client_answered']} answers, {once['duplicate_ids']} duplicate and {once['mismatched_ids']} mismatched ids; "
        f"server ledger: {once['server']}).",
        "",
        f"**After the overload** (c=64 against a queue of {cfg['max_queue']}): {result['recovery']['answered']}/{result['recovery']['sent']} "
        f"sequential requests answered with 200. 5xx other than 503 in the whole run: {result['non_503_5xx']}.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    levels = [int(c) for c in args.concurrency.split(",")]
    bodies = questions(args.workload)
    info = machine()
    rounds, round_levels = [], []
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        proc, base = start_server(args, Path(tmp))
        try:
            asyncio.run(run_level(base, bodies, 4, 2 * args.max_batch_size, 300, "warmup"))
            before = ledger(base)
            results = []
            for c in levels:
                lv = asyncio.run(run_level(base, bodies, c, args.requests, args.level_seconds, f"c{c}"))
                results.append(lv)
                print(f"c={c}: {lv['answered']}/{lv['sent']} answered, {lv['status_503']} x 503, {lv['throughput_rps']:.2f} req/s, "
                      f"p50 {lv['p50_ms']:.0f} ms, p99 {lv['p99_ms']:.0f} ms", flush=True)
            recovery = asyncio.run(run_level(base, bodies, 1, 5, 600, "recovery"))
            for k in range(args.rounds):
                one = asyncio.run(run_level(base, bodies, 1, args.requests, args.round_seconds, f"r{k}c1"))
                sixteen = asyncio.run(run_level(base, bodies, 16, args.requests, args.round_seconds, f"r{k}c16"))
                round_levels += [one, sixteen]
                rounds.append(sixteen["throughput_rps"] / one["throughput_rps"])
                print(f"round {k}: c=1 {one['throughput_rps']:.2f} req/s, c=16 {sixteen['throughput_rps']:.2f} req/s, ratio {rounds[-1]:.2f}", flush=True)
            after = ledger(base)
        finally:
            proc.send_signal(signal.SIGINT)  # graceful shutdown of the server this script started
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    every = results + [recovery] + round_levels
    server = {k: int(after.get(k, 0) - before.get(k, 0)) for k in ("accepted", "answered", "timed_out", "cancelled", "failed", "duplicates")}
    once = {
        "client_answered": sum(lv["answered"] for lv in every),
        "duplicate_ids": sum(lv["duplicate_ids"] for lv in every),
        "mismatched_ids": sum(lv["mismatched_ids"] for lv in every),
        "server": server,
    }
    once["ok"] = (server["accepted"] == server["answered"] == once["client_answered"] and once["duplicate_ids"] == 0
                  and once["mismatched_ids"] == 0 and server["duplicates"] == 0)
    by_c = {lv["concurrency"]: lv for lv in results}
    result = {
        "command": " ".join(["PYTHONPATH=src python benchmarks/serve_load.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": info, "load_average_at_end": os.getloadavg(),
        "config": vars(args),
        "levels": results,
        "recovery": recovery,
        "rounds": round_levels,
        "ratio": {"per_round": rounds, "median": statistics.median(rounds) if rounds else float("nan")},
        "table_ratio": by_c[16]["throughput_rps"] / by_c[1]["throughput_rps"] if 1 in by_c and 16 in by_c else float("nan"),
        "exactly_once": once,
        "non_503_5xx": sum(v for lv in every for k, v in lv["statuses"].items() if int(k) >= 500 and int(k) != 503),
    }
    write_report(ROOT / args.out, result)
    print((ROOT / args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
