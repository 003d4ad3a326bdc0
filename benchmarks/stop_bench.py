"""Time from SIGTERM to the end of a running ``dagster asset materialize`` (issue 16, part 3).

    python benchmarks/stop_bench.py                       # 10 and 100 req/s, one-page and many-page ranges
    python benchmarks/stop_bench.py --repo /work/main     # the same against another checkout (before/after)

Each case: a simulator in this process (100 ± 20 ms latency; pages capped at ``--page-cap`` rows for
"many pages", uncapped for "one page": every range fits one 50,000-row page), a temporary
DAGSTER_HOME, the manifest of the sample's 15 symbols, then ``event_windows`` over all of them as one
range run (the default multiprocess executor, 12 workers) in its own process group. ``--after`` seconds
after its first request the group gets SIGTERM; printed: seconds until no process of the group is left,
requests that reached the server after the signal and the last one's delay, and the run's status.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _bootstrap  # noqa: F401
from _common import load_average, table

from smallcaps_ingest.simulator import SimConfig, Simulator

BIN = Path(sys.executable).parent
IN_PROCESS = '{"execution": {"config": {"in_process": {}}}}'


def group_alive(pgid: int) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
    return False


def one_case(repo: Path, rps: int, page_cap: int | None, after: float, workdir: Path,
             in_process: bool = False) -> dict[str, object]:
    extra = ("--config-json", IN_PROCESS) if in_process else ()
    home = workdir / "home"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text((repo / "dagster_home" / "dagster.yaml").read_text())
    with Simulator(SimConfig(latency_ms=100, latency_jitter_ms=20, page_cap=page_cap, seed=1)) as sim:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("POLYGON_", "SMALLCAPS_", "DAGSTER_"))}
        env.update(
            DAGSTER_HOME=str(home), SMALLCAPS_DATA_DIR=str(workdir / "data"), PYTHONPATH=str(repo),
            POLYGON_BASE_URL=sim.base_url, POLYGON_API_KEY="bench-key", POLYGON_MAX_RPS=str(rps),
            POLYGON_WORKERS="12", POLYGON_BUDGET_PATH=str(workdir / "budget.sqlite"),
        )
        dagster = [str(BIN / "dagster"), "asset", "materialize", "-m", "smallcaps_ingest"]
        subprocess.run([*dagster, "--select", "manifest"], cwd=repo, env=env, check=True, capture_output=True)
        t0 = time.monotonic()
        with open(workdir / "run.log", "wb") as log:
            proc = subprocess.Popen(
                [*dagster, "--select", "event_windows", "--partition-range", "AAOI...XELB", *extra],
                cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            while not [r for r in sim.request_log() if r.t >= t0]:
                if proc.poll() is not None or time.monotonic() - t0 > 120:
                    raise RuntimeError((workdir / "run.log").read_text()[-2000:])
                time.sleep(0.02)
            time.sleep(after)
            if proc.poll() is not None:
                raise RuntimeError("the run finished before the signal: raise --after's ceiling or lower rps")
            t_term = time.monotonic()
            os.killpg(proc.pid, signal.SIGTERM)
            while group_alive(proc.pid) and time.monotonic() - t_term < 300:
                time.sleep(0.02)
            gone = time.monotonic() - t_term
        finally:
            if group_alive(proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        late = [r.t - t_term for r in sim.request_log() if r.t > t_term]
    status = subprocess.run(
        [sys.executable, "-c", "import dagster as dg; i = dg.DagsterInstance.get(); "
         "print(i.get_runs(limit=1)[0].status.value)"],
        env=env, capture_output=True, text=True,
    ).stdout.strip()
    return {"gone_s": round(gone, 2), "late_requests": len(late),
            "last_late_s": round(max(late, default=0.0), 2), "status": status}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1], help="checkout to run")
    ap.add_argument("--rps", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--page-cap", type=int, default=1000, help="rows per page for the many-page case")
    ap.add_argument("--after", type=float, default=4.0, help="seconds from the first request to SIGTERM")
    ap.add_argument("--in-process", action="store_true", help="the in-process executor (one process)")
    ap.add_argument("--keep", type=Path, help="keep each case's directory (run.log) under this one")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--cases", choices=("both", "one", "many"), default="both")
    args = ap.parse_args()
    rows = []
    for rps in args.rps:
        cases = [("one page", None), (f"{args.page_cap}-row pages", args.page_cap)]
        cases = {"both": cases, "one": cases[:1], "many": cases[1:]}[args.cases]
        for label, cap in cases:
            for _ in range(args.repeat):
                with contextlib.ExitStack() as stack:
                    if args.keep:
                        args.keep.mkdir(parents=True, exist_ok=True)
                        tmp = tempfile.mkdtemp(prefix="stop_bench_", dir=args.keep)
                    else:
                        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="stop_bench_"))
                    r = one_case(args.repo.resolve(), rps, cap, args.after, Path(tmp), args.in_process)
                rows.append((rps, label, r["gone_s"], r["late_requests"], r["last_late_s"], r["status"]))
                print(rows[-1], flush=True)
    executor = "in_process" if args.in_process else "multiprocess"
    print(table(("req/s", "ranges", "gone after SIGTERM (s)", "requests after", "last request after (s)",
                 "run status"), rows,
                title=f"stop after SIGTERM: {args.repo}, {executor} executor (load {load_average()})"))


if __name__ == "__main__":
    main()
