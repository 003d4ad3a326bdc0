"""Text for people: byte and duration formats, the ``status`` report, and the scan's progress bar."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TextIO


def format_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TB"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h:02d}h {m:02d}m"
    if h:
        return f"{h}h {m:02d}m"
    if m:
        return f"{m}m {s:02d}s"
    return f"{s}s"


def _n(v: Any) -> str:
    return "?" if v is None else f"{v:,}"


def render_text(st: Mapping[str, Any]) -> str:
    m, ev, sy, dk = st["manifest"], st["events"], st["symbols"], st["disk"]
    inst, tp, api, er = st["instance"], st["throughput"], st["api"], st["errors"]
    lines = [f"smallcaps-ingest status  {st['data_dir']}  ({st['generated_at'][:19]}Z)"]
    if m["present"]:
        lines.append(f"  manifest    {_n(m['events'])} events, {_n(m['symbols'])} symbols")
        lines.append(
            f"  events      done {_n(ev['done'])} ({ev['pct_done']:.1f}%)  partial {_n(ev['partial'])}  "
            f"missing {_n(ev['missing'])}"
            + (f"  on disk, not in manifest {_n(ev['extra_on_disk'])}" if ev["extra_on_disk"] else "")
        )
        lines.append(
            f"  symbols     complete {_n(sy['complete'])} / {_n(sy['total'])}  "
            f"(started {_n(sy['started'])}, not started {_n(sy['not_started'])})"
        )
    else:
        if m.get("error"):
            lines.append(f"  manifest    unreadable ({m['path']}): {m['error']}")
        else:
            lines.append(f"  manifest    none yet ({m['path']}): materialize the manifest asset first")
        lines.append(
            f"  events      on disk: complete {_n(ev['complete_on_disk'])}, partial "
            f"{_n(ev['partial_on_disk'])} (no manifest to count missing ones)"
        )
        lines.append(f"  symbols     on disk {_n(sy['on_disk'])}")
    if dk["tmp_orphans"] is None:
        lines.append(f"  disk        {format_bytes(dk['bytes'])} in complete events (from the instance)")
    else:
        lines.append(
            f"  disk        {_n(dk['files'])} files, {format_bytes(dk['bytes'])}, "
            f"{_n(dk['tmp_orphans'])} tmp orphan(s)"
        )
    lines += _instance_lines(inst, tp, api, er)
    for note in st.get("notes", []):
        if note != inst["message"]:  # already on the instance line
            lines.append(f"  note: {note}")
    return "\n".join(lines)


def _instance_lines(inst: Mapping[str, Any], tp: Mapping[str, Any], api: Mapping[str, Any],
                    er: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    if inst["present"]:
        rate = tp["events_per_min"]
        eta = tp.get("eta")
        rate_s = f"{rate:,.1f} events/min" if rate is not None else "no rate"
        lines.append(
            f"  throughput  {rate_s} ({tp['basis']}, {tp['materializations']} materializations)"
            + (f"  ETA {eta}" if eta else "")
        )
        rps = api["requests_per_s"]
        util = api["utilization"]
        lines.append(
            "  API         "
            + (
                f"{rps:,.1f} req/s of {api['max_rps']:g} max ({util:.0%})"
                if rps is not None
                else f"no recent requests (max {api['max_rps']:g} req/s)"
            )
            + f"  429s {api['429s']}  budget wait {api['budget_wait_s']:.1f}s"
        )
        by = ", ".join(f"{k} {v}" for k, v in er["by_type"].items() if v) or "none"
        lines.append(f"  errors      {by}  |  failed runs {_n(er['failed_runs'])}")
        lines.append(
            f"  instance    {inst['dagster_home']}: {_n(inst['partitions'])} partitions, "
            f"{_n(inst['materialized_partitions'])} materialized, {_n(inst['materializations'])} "
            f"materializations, {_n(inst['runs_in_progress'])} run(s) in progress"
        )
    else:
        lines.append(f"  instance    {inst['message']} (no throughput, ETA, API usage or errors)")
    return lines


class ScanProgress:
    """The ``status --verify`` progress bar (tqdm) on a terminal stream, cleared when closed so the
    report prints on a clean line."""

    def __init__(self, stream: TextIO = sys.stderr, label: str = "scanning symbols") -> None:
        self.stream, self.label = stream, label
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.label, file=self.stream, ascii=" #", leave=False,
                            bar_format="{desc} [{bar:30}] {n_fmt}/{total_fmt}", mininterval=0.1)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.stream.write("\r\x1b[K")
            self.stream.flush()
