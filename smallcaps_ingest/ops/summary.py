"""The Dagster half of ``status``: the instance, throughput, errors and lifetime sums, plus what the
partitions' last materializations say about the counts (used unless ``status --verify``)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from smallcaps_ingest.ops import instance as ins

Counts = tuple[dict[str, ins.MatPoint], list[str], tuple[int, int] | None]


def instance_summary(
    instance: Any, *, now: float, window_s: float, last_n: int = ins.DEFAULT_LAST_N,
    cache_path: str | None = None,
) -> tuple[dict[str, Any], Counts]:
    """(the instance's part of the status dict, (latest materialization per materialized partition,
    the registered partitions, the manifest's (events, symbols)))."""
    t0 = time.perf_counter()
    partitions = list(instance.get_dynamic_partitions(ins.PARTITIONS))
    materialized = instance.get_materialized_partitions(ins.EW)
    ledger = ins.read_ledger(instance, cache_path)
    latest = {k: v for k, v in ledger.latest.items() if k in materialized}
    recent = ledger.window(now - window_s)
    fallback = [] if recent else ledger.last(last_n)
    tp = ins.throughput(recent, now=now, window_s=window_s, fallback=fallback,
                        capped=len(recent) >= ins.RECENT_LIMIT)
    life = ledger.totals
    recent_errors: Counter[str] = Counter()
    for p in recent or fallback:
        recent_errors.update(p.errors)
    failed = ins.runs_touching(instance, ["FAILURE"])
    running = ins.runs_touching(instance, ins.NOT_FINISHED)
    out = {
        "instance": {
            "present": True,
            "dagster_home": getattr(instance, "root_directory", None),
            "partitions": len(partitions),
            "materialized_partitions": len(materialized),
            "materializations": life["materializations"],
            "reconciled_materializations": life["reconciled"],
            "runs_in_progress": len(running),
            "runs_in_progress_ids": [r["run_id"] for r in running[: ins.EXAMPLES]],
            "message": None
            if partitions or materialized
            else (
                "the instance has no 'symbols' partitions and no event_windows materialization yet "
                "(materialize the manifest asset first)"
            ),
        },
        "throughput": tp,
        "errors": {
            "by_type": dict(sorted(life["errors_by_type"].items())),
            "total": sum(life["errors_by_type"].values()),
            "recent_by_type": dict(sorted(recent_errors.items())),
            "failed_runs": len(failed),
            "failed_run_ids": [r["run_id"] for r in failed[: ins.EXAMPLES]],
        },
        "lifetime": {"events_written": life["events_written"], "requests": life["requests"],
                     "429s": life["429s"]},
        "timings_s": {},
    }
    counts = (latest, partitions, ins.manifest_counts(instance))
    out["timings_s"]["instance_queries"] = round(time.perf_counter() - t0, 4)
    return out, counts


def no_instance(message: str, dagster_home: str | None = None) -> dict[str, Any]:
    """The instance's part of the status dict when there is no instance to read."""
    return {
        "instance": {
            "present": False,
            "dagster_home": dagster_home,
            "partitions": None,
            "materialized_partitions": None,
            "materializations": None,
            "reconciled_materializations": None,
            "runs_in_progress": None,
            "runs_in_progress_ids": [],
            "message": message,
        },
        "throughput": ins.idle_throughput("no instance"),
        "errors": {"by_type": {}, "total": 0, "recent_by_type": {}, "failed_runs": None,
                   "failed_run_ids": []},
        "lifetime": {"events_written": None, "requests": None, "429s": None},
        "timings_s": {},
    }
