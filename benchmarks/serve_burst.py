"""A burst of concurrent chat requests against `medmoe serve` on 127.0.0.1: admission refuses early.

Starts the server with the default settings (SmolLM2-135M, 64 new tokens, 30 s request timeout) and
1 torch thread, then sends --bursts bursts of --concurrency simultaneous /v1/chat/completions
requests (Dental test questions) and counts the status codes. What admission control promises: every
request either gets 200, or 503 with Retry-After at once; none waits out the timeout (504).

    PYTHONPATH=src python benchmarks/serve_burst.py
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from common import write_report
from serve_load import questions, start_server


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--concurrency", type=int, default=40)
    p.add_argument("--bursts", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    # the server's defaults (ServeConfig), which the 40-request burst used
    args.max_batch_size, args.max_wait_ms, args.max_queue, args.timeout, args.max_new_tokens = 16, 10.0, 128, 30.0, 64
    return args


async def burst(base: str, bodies: list[dict]) -> dict:
    async def one(client: httpx.AsyncClient, body: dict) -> tuple[int, str | None, float]:
        start = time.perf_counter()
        r = await client.post(f"{base}/v1/chat/completions", json=body)
        return r.status_code, r.headers.get("Retry-After"), time.perf_counter() - start

    async with httpx.AsyncClient(timeout=120) as client:
        start = time.perf_counter()
        got = await asyncio.gather(*(one(client, b) for b in bodies))
        wall = time.perf_counter() - start
    refused = [s for code, _, s in got if code == 503]
    return {"status": dict(Counter(str(code) for code, _, _ in got)), "wall_s": round(wall, 2),
            "retry_after": sorted({int(ra) for code, ra, _ in got if code == 503 and ra}),
            "slowest_refusal_s": round(max(refused), 3) if refused else None}


def main() -> None:
    args = parse_args()
    pool = questions("open")
    with tempfile.TemporaryDirectory() as tmp:
        proc, base = start_server(args, Path(tmp))
        try:
            results = []
            for b in range(args.bursts):
                bodies = [{"messages": [{"role": "user", "content": q["question"]}]}
                          for q in pool[b * args.concurrency:(b + 1) * args.concurrency]]
                results.append(asyncio.run(burst(base, bodies)))
                print(f"burst {b + 1}: {results[-1]}")
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    rows = "\n".join(f"| {i + 1} | {r['status'].get('200', 0)} | {r['status'].get('503', 0)} | {r['status'].get('504', 0)} | "
                     f"{sum(v for k, v in r['status'].items() if k not in ('200', '503', '504'))} | {r['retry_after']} | "
                     f"{r['slowest_refusal_s']} | {r['wall_s']} |" for i, r in enumerate(results))
    body = (f"{args.concurrency} simultaneous chat completions per burst, {args.bursts} bursts, `{args.model}`, "
            f"{args.threads} torch thread, server defaults (max_batch_size 16, max_wait_ms 10, max_new_tokens 64, "
            "request timeout 30 s). Before admission control (issue 15): 16-24 of 40 got 504 after 30 s, no 503.\n\n"
            "| burst | 200 | 503 | 504 | other | Retry-After (s) | slowest 503 (s) | wall (s) |\n|---|---|---|---|---|---|---|---|\n"
            + rows)
    print(write_report("serve_burst", "Server: a burst of concurrent chat requests", body,
                       {"config": vars(args), "bursts": results}))


if __name__ == "__main__":
    main()
