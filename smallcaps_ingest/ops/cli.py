"""``smallcaps-ingest``: status, plan, doctor, partition-range, cleanup, reconcile and report, from a shell.

Settings come from one ``Config.from_env()`` (flags override it); commands get plain values.
Exit codes: 0 ok, 1 a clear error (no partitions, no manifest, cleanup refused...), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from smallcaps_ingest.config import Config, ConfigError
from smallcaps_ingest.ops.render import format_duration

PARTITIONS = "symbols"


def _err(msg: str) -> int:
    print(f"smallcaps-ingest: {msg}", file=sys.stderr)
    return 1


def _dump(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _emit(args: argparse.Namespace, obj: Any, render_text: Callable[[Any], str]) -> int:
    """``obj`` as JSON with ``--json``, else as ``render_text`` renders it for people; exit 0."""
    if args.json:
        _dump(obj)
    else:
        print(render_text(obj))
    return 0


def _config(args: argparse.Namespace, **overrides: Any) -> Config:
    """The settings, ``--data-dir`` (made absolute; or an s3:// URL) over ``SMALLCAPS_DATA_DIR``, and
    ``overrides``."""
    from smallcaps_ingest.config import data_dir_from

    data_dir = getattr(args, "data_dir", None)
    if data_dir:
        overrides["data_dir"] = data_dir_from(data_dir)
    return Config.from_env(**overrides)


def _open_instance(config: Config) -> tuple[Any, str | None]:
    from smallcaps_ingest.ops.instance import open_instance

    return open_instance(config.dagster_home)


def cmd_status(args: argparse.Namespace) -> int:
    from smallcaps_ingest.ops import render, status

    config = _config(args)
    bar = None
    if not args.no_progress and sys.stdout.isatty() and sys.stderr.isatty():
        bar = render.ScanProgress(sys.stderr)
    try:
        result = status.collect_status(
            config.data_dir,
            use_instance=not args.no_instance,
            dagster_home=config.dagster_home,
            window_minutes=args.window_minutes,
            max_rps=args.max_rps or config.max_rps,
            verify=args.verify,
            progress=bar,
        )
    finally:
        if bar is not None:
            bar.close()
    return _emit(args, result, render.render_text)


def cmd_partition_range(args: argparse.Namespace) -> int:
    instance, message = _open_instance(_config(args))
    if instance is None:
        return _err(f"{message}; cannot list the '{PARTITIONS}' partitions")
    return _partition_range(list(instance.get_dynamic_partitions(PARTITIONS)), instance.root_directory)


def _partition_range(keys: list[str], root: str) -> int:
    if not keys:
        return _err(
            f"the instance at {root} has no '{PARTITIONS}' partitions yet: "
            "materialize the manifest asset first (it registers one partition per symbol)"
        )
    print(f"{keys[0]}...{keys[-1]}")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from smallcaps_ingest.ops import cleanup

    config = _config(args)
    instance, message = _open_instance(config)
    res = cleanup.cleanup(
        config.data_dir,
        instance,
        grace_minutes=args.grace_minutes,
        dry_run=args.dry_run,
        force=args.force,
        instance_message=message,
    )
    if args.json:
        _dump(res)
    else:
        print(cleanup.render_cleanup(res), file=sys.stderr if res["refused"] else sys.stdout)
    return 1 if res["refused"] or res["errors"] else 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from smallcaps_ingest.ops import reconcile
    from smallcaps_ingest.ops.status import StatusError

    config = _config(args)
    instance, message = _open_instance(config)
    if instance is None:
        return _err(f"{message}; reconcile compares the disk with the instance")
    try:
        res = reconcile.reconcile(config.data_dir, instance, fix=args.fix)
    except StatusError as e:
        return _err(str(e))
    return _emit(args, res, reconcile.render_reconcile)


def cmd_report(args: argparse.Namespace) -> int:
    from smallcaps_ingest.ops import report

    data_dir = _config(args).data_dir
    try:
        out = report.run_report(data_dir)
    except report.ReportError as e:
        return _err(str(e))
    if args.json:
        _dump({"totals": out.totals, "parquet": str(out.parquet), "plot": str(out.plot)})
    else:
        print(out.markdown_table)
        print(f"\nwrote {out.parquet} and {out.plot}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from smallcaps_ingest.ops import preview

    config = _config(args)
    data_dir = config.data_dir
    try:
        budget = preview.Settings.from_config(config)
        settings = preview.Settings.from_config(config, args.max_rps) if args.max_rps else budget
        res = preview.preview(data_dir, settings)
        if settings.max_rps != budget.max_rps:  # the allowance (hence the plan) follows the rate
            other = preview.preview(data_dir, budget)
            res["at_budget"] = {k: other[k] for k in ("max_rps", "requests", "seconds")}
    except preview.PreviewError as e:
        return _err(str(e))
    if args.json:
        _dump(res)
    else:
        print(preview.render_text(res))
        if "at_budget" in res:
            b = res["at_budget"]
            print(
                f"  at POLYGON_MAX_RPS={b['max_rps']:g}: {b['requests']['total']:,} requests, "
                f"{format_duration(b['seconds'])}"
            )
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from smallcaps_ingest.ops import doctor

    def emit(c: Any) -> None:
        if not args.json:
            print(doctor.render(c), flush=True)

    config = _config(args, **({"max_rps": args.max_rps} if args.max_rps else {}))
    checks = doctor.run_checks(config, ticker=args.ticker, emit=emit)
    ok = all(c.ok for c in checks)
    if args.json:
        _dump({"ok": ok, "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks]})
    else:
        failed = [c.name for c in checks if not c.ok]
        print("all checks passed" if ok else f"{len(failed)} check(s) failed: {', '.join(failed)}")
    return 0 if ok else 1


def _status_parser(s: argparse.ArgumentParser, data_dir_opt: Any) -> None:
    data_dir_opt(s)
    s.add_argument("--json", action="store_true", help="print a machine-readable dict")
    s.add_argument(
        "--window-minutes",
        type=float,
        default=30.0,
        help="recent window for events/min, ETA and requests/s (default 30)",
    )
    s.add_argument(
        "--max-rps", type=float, default=None, help="the request budget (default $POLYGON_MAX_RPS or 90)"
    )
    s.add_argument(
        "--no-instance", action="store_true", help="disk and manifest only (no instance is opened)"
    )
    s.add_argument("--no-progress", action="store_true", help="never draw a progress bar")
    s.add_argument(
        "--verify",
        action="store_true",
        help="walk the disk and count every event (partial, extra, empty, tmp orphans); default: the "
        "counts each partition's last materialization recorded",
    )
    s.set_defaults(func=cmd_status)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smallcaps-ingest",
        description="Ingest status, partition range, cleanup, reconcile and report for smallcaps_ingest.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def data_dir_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data-dir", help="the data directory (default: $SMALLCAPS_DATA_DIR or ./data)")

    _status_parser(sub.add_parser("status", help="events done/partial/missing, throughput, ETA, API usage, "
                                  "errors"), data_dir_opt)

    pr = sub.add_parser("partition-range", help="FIRST...LAST of the instance's 'symbols' partitions")
    pr.set_defaults(func=cmd_partition_range)

    c = sub.add_parser("cleanup", help="remove *.tmp* orphans older than a grace period (no run in progress)")
    data_dir_opt(c)
    c.add_argument("--grace-minutes", type=float, default=60.0)
    c.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    c.add_argument("--force", action="store_true", help="clean up even while runs are in progress")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_cleanup)

    r = sub.add_parser("reconcile", help="disk against the instance: materialized-but-incomplete and back")
    data_dir_opt(r)
    r.add_argument(
        "--fix",
        action="store_true",
        help="record complete partitions as materialized; mark incomplete ones for re-materialization",
    )
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_reconcile)

    pl_ = sub.add_parser("plan", help="what fetching the manifest costs (requests, time, bytes); no request")
    data_dir_opt(pl_)
    pl_.add_argument("--json", action="store_true", help="print a machine-readable dict")
    pl_.add_argument(
        "--max-rps",
        type=float,
        default=None,
        help="plan at this request rate (default $POLYGON_MAX_RPS or 90); the budget's figures are shown too",
    )
    pl_.set_defaults(func=cmd_plan)

    dr = sub.add_parser("doctor", help="check key, host, entitlements, instance, budget and data dir")
    data_dir_opt(dr)
    dr.add_argument("--json", action="store_true")
    dr.add_argument("--ticker", default="AAPL", help="a liquid ticker for the two 1-row requests (AAPL)")
    dr.add_argument("--max-rps", type=float, default=None, help="request budget (default $POLYGON_MAX_RPS)")
    dr.set_defaults(func=cmd_doctor)

    rp = sub.add_parser("report", help="write _reports/ingestion_report.{parquet,png} (no Dagster needed)")
    data_dir_opt(rp)
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(func=cmd_report)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `smallcaps-ingest status | head`
        return 0
    except ConfigError as e:  # a bad setting: named, before anything is read or written
        return _err(str(e))


if __name__ == "__main__":
    sys.exit(main())
