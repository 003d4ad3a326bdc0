"""Events per minute with the tree on S3 against local disk: the same manifest, the same budget.

The simulator runs in its own process (``SimHost``: 100 +- 20 ms latency per request, bodies at
25 MB/s, a server-side limit equal to the budget), warmed before any clock starts (``warm`` and
``warm_ours``, as in throughput.py). The S3 endpoint is moto's server (``moto_server``, from PyPI)
in its own process on 127.0.0.1, reached through the AWS_* variables, one new bucket per run. Each
round runs ``FetchEngine`` (``run_engine``: the engine's default workers and over-fetch allowance
for the budget, a fresh budget file, a cold density store) once into a new local directory and
once into ``s3://bucket/round-K``, alternating which goes first; figures from the engine's own
clock and the simulator's request log. A sample of each tree is checked against the ground truth.

moto keeps objects in memory and answers on loopback: a PUT costs ~1-3 ms here, against ~10-30 ms
from a pod to real S3 in the same region, so this measures the platform's own overhead (one PUT per
file, one LIST per symbol on resume, no fsync) rather than S3's latency; with 12-32 workers and
two PUTs per event, even 30 ms per PUT is far below the ~100 ms per request the API costs.

    python benchmarks/s3_bench.py                     # 50 req/s, clustered, 3 rounds
    python benchmarks/s3_bench.py --budget 20 --events 300 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import _bootstrap  # noqa: F401
from _common import SimHost, load_average, run_engine, served_rate, table, verify_outputs
from manifests import describe, make, to_work

from smallcaps_ingest import storage
from smallcaps_ingest.core.cost import default_workers
from smallcaps_ingest.core.plan import overfetch_allowance


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """moto's S3 server in its own process on loopback; the AWS variables that reach it."""
    port = _free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_REGION": "us-east-1"}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, env
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=50.0, help="requests per second (default 50)")
    ap.add_argument("--events", type=int, default=500, help="events in the manifest (default 500)")
    ap.add_argument("--manifest", default="clustered", help="manifest shape (manifests.py)")
    ap.add_argument("--rounds", type=int, default=3, help="local/S3 pairs, alternating order")
    a = ap.parse_args()

    print(f"load average at start: {load_average()}")
    events = make(a.manifest, a.events)
    print(f"manifest: {describe(events)}")
    workers = default_workers(a.budget)
    moto, aws = start_moto()
    os.environ.update(aws)  # what botocore (under s3fs) reads; never printed
    rows: list[tuple[object, ...]] = []
    checks: list[str] = []
    try:
        with SimHost(latency_ms=100, latency_jitter_ms=20, transfer_bytes_per_s=25e6) as sim, \
                tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
            sim.warm(events)
            secs = sim.warm_ours(events, a.budget, Path(tmp) / "warm", workers)
            print(f"simulator warmed (ours' ranges by a run of ours in {secs:.1f} s)", flush=True)
            sim.set(rate_limit_rps=a.budget)
            for k in range(a.rounds):
                bucket = f"bench-{uuid.uuid4().hex[:12]}"
                storage.s3().mkdir(bucket)
                targets = [("local", str(Path(tmp) / f"local-{k}")), ("s3", f"s3://{bucket}/round-{k}")]
                for where, data_dir in targets if k % 2 == 0 else targets[::-1]:
                    sim.reset()
                    run = run_engine(sim.base_url, to_work(events), a.budget,
                                     Path(tmp) / f"budget-{k}-{where}.sqlite", data_dir, workers=workers,
                                     overfetch_rows=overfetch_allowance(a.budget), label=where)
                    rate, span, ok = served_rate(sim.log())
                    sample = verify_outputs(data_dir, events[:: max(1, len(events) // 20)])
                    checks.append(f"round {k} {where}: {sum(r[-1] for r in sample)}/{len(sample)} "
                                  "sampled events exact")
                    rows.append((k, where, run.events, run.errors, run.requests, round(run.seconds, 1),
                                 round(rate, 1), round(rate / a.budget, 3),
                                 round(run.events / run.seconds * 60)))
                    print(f"  round {k} {where}: {run.events} events in {run.seconds:.1f} s", flush=True)
    finally:
        moto.terminate()
        moto.wait(timeout=10)
    print()
    print(table(["round", "tree", "events", "errors", "requests", "seconds", "served/s", "util",
                 "events/min"], rows,
                title=f"S3 (moto on loopback) vs local disk, {a.manifest} x {a.events} events, "
                      f"budget {a.budget:g} req/s = server limit, {workers} workers"))
    for where in ("local", "s3"):
        mine = [r for r in rows if r[1] == where]
        print(f"  {where}: median {sorted(r[-1] for r in mine)[len(mine) // 2]} events/min over "
              f"{len(mine)} runs")
    for c in checks:
        print(f"  {c}")
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
