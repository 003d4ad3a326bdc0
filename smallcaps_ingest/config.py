"""Every setting in one place: its environment variable, default and validation.

``Config.from_env()`` is the only code that reads the environment (besides Dagster's own
``dg.EnvVar("POLYGON_API_KEY")``, which keeps the key out of run config). Everything else takes a
``Config`` (or the values it needs) as an argument. A bad value raises ``ConfigError`` naming the
variable and the value before anything is requested or written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from smallcaps_ingest import storage

OFFICIAL_BASE_URL = "https://api.polygon.io"
SIMULATOR = "simulator"  # POLYGON_BASE_URL=simulator: the bundled simulator, in process
SIMULATOR_KEY = "simulator-demo-key"  # the bundled simulator accepts any key
DEFAULT_MAX_RPS = 90.0
ON = ("on", "1", "true", "yes")
OFF = ("off", "0", "false", "no", "")


class ConfigError(ValueError):
    """A setting that cannot work, named with its environment variable."""


@dataclass(frozen=True)
class Config:
    """The validated settings of one process. ``api_key`` is never shown (``repr=False``)."""

    data_dir: str = field(default="./data", metadata={"env": "SMALLCAPS_DATA_DIR"})
    events_path: str = field(default="", metadata={"env": "SMALLCAPS_EVENTS"})  # "": the sample
    quotes_hz: float = field(default=1.0, metadata={"env": "SMALLCAPS_QUOTES_HZ"})  # 0: raw quotes
    max_overfetch: float = field(default=4.0, metadata={"env": "SMALLCAPS_MAX_OVERFETCH"})
    overfetch_rows: int | None = field(default=None, metadata={"env": "SMALLCAPS_OVERFETCH_ROWS"})  # auto
    base_url: str = field(default=OFFICIAL_BASE_URL, metadata={"env": "POLYGON_BASE_URL"})
    api_key: str = field(default="", repr=False, metadata={"env": "POLYGON_API_KEY"})
    max_rps: float = field(default=DEFAULT_MAX_RPS, metadata={"env": "POLYGON_MAX_RPS"})
    workers: int | None = field(default=None, metadata={"env": "POLYGON_WORKERS"})  # auto: by max_rps
    budget_url: str = field(default="", metadata={"env": "POLYGON_BUDGET_URL"})  # "": see budget_url_for
    budget_timeout: float = field(default=120.0, metadata={"env": "POLYGON_BUDGET_TIMEOUT"})
    automation: bool = field(default=False, metadata={"env": "SMALLCAPS_AUTOMATION"})
    automation_interval: int = field(default=60, metadata={"env": "SMALLCAPS_AUTOMATION_INTERVAL"})
    dagster_home: str | None = field(default=None, metadata={"env": "DAGSTER_HOME"})

    @property
    def is_simulator(self) -> bool:
        return self.base_url.strip().lower() == SIMULATOR

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Read and validate every setting; ``overrides`` (e.g. a CLI's ``--max-rps``) win."""
        e = os.environ if env is None else env
        home = _text(e, "DAGSTER_HOME") or None
        data_dir = _data_dir(_text(e, "SMALLCAPS_DATA_DIR") or "./data")
        values: dict[str, Any] = dict(
            data_dir=data_dir,
            events_path=os.path.abspath(p) if (p := _text(e, "SMALLCAPS_EVENTS")) else "",
            quotes_hz=_number(e, "SMALLCAPS_QUOTES_HZ", 1.0, minimum=0, maximum=1e9),
            max_overfetch=_number(e, "SMALLCAPS_MAX_OVERFETCH", 4.0, minimum=1),
            overfetch_rows=_auto_int(e, "SMALLCAPS_OVERFETCH_ROWS", minimum=0),
            base_url=_text(e, "POLYGON_BASE_URL") or OFFICIAL_BASE_URL,
            api_key=e.get("POLYGON_API_KEY") or "",
            max_rps=_number(e, "POLYGON_MAX_RPS", DEFAULT_MAX_RPS, minimum=0.001),
            workers=_auto_int(e, "POLYGON_WORKERS", minimum=1),
            budget_url=_budget_url(e, home, data_dir),
            budget_timeout=_number(e, "POLYGON_BUDGET_TIMEOUT", 120.0, minimum=0),
            automation=_switch(e, "SMALLCAPS_AUTOMATION"),
            automation_interval=int(_number(e, "SMALLCAPS_AUTOMATION_INTERVAL", 60, int, minimum=1)),
            dagster_home=home,
        )
        values.update(overrides)
        return cls(**values)

    def events_or_sample(self) -> str:
        """The events file to read: ``SMALLCAPS_EVENTS``, else the bundled sample."""
        if self.events_path:
            return self.events_path
        from smallcaps_ingest.simulator.sample import SAMPLE_EVENTS_PATH

        return str(SAMPLE_EVENTS_PATH)


def variables() -> list[tuple[str, str, object]]:
    """(environment variable, field, default) of every setting: the table the README documents."""
    return [(f.metadata["env"], f.name, f.default) for f in fields(Config)]


def _text(env: Mapping[str, str], name: str) -> str:
    return (env.get(name) or "").strip()


def _number(
    env: Mapping[str, str], name: str, default: float, kind: type = float,
    minimum: float | None = None, maximum: float | None = None,
) -> float:
    raw = _text(env, name)
    if not raw:
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name}={raw!r} must be a finite number")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={raw!r} must be >= {minimum:g}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={raw!r} must be <= {maximum:g}")
    return value


def _auto_int(env: Mapping[str, str], name: str, minimum: int) -> int | None:
    if _text(env, name).lower() in ("", "auto"):
        return None
    return int(_number(env, name, 0, int, minimum=minimum))


def _switch(env: Mapping[str, str], name: str) -> bool:
    raw = _text(env, name).lower()
    if raw in ON:
        return True
    if raw in OFF:
        return False
    raise ConfigError(f"{name}={raw!r}: use on or off")


def data_dir_from(raw: str) -> str:
    """``SMALLCAPS_DATA_DIR``'s value (or a CLI's ``--data-dir``), validated: see ``_data_dir``."""
    return _data_dir(raw.strip() or "./data")


def _data_dir(raw: str) -> str:
    """A local directory, made absolute, or ``s3://bucket[/prefix]`` (``storage.py``; credentials
    only from the AWS_* variables). Any other URL is refused before anything is written: taken as
    a path it would silently become a local directory named ``gs:`` or ``http:``."""
    if raw.startswith("file://"):
        return os.path.abspath(raw.removeprefix("file://"))
    if "://" not in raw:
        return os.path.abspath(raw)
    from urllib.parse import urlsplit

    from smallcaps_ingest.storage import SCHEMES

    scheme = raw.split("://", 1)[0]
    if scheme.lower() not in SCHEMES:
        raise ConfigError(
            f"SMALLCAPS_DATA_DIR={raw!r}: {scheme}:// is not supported (a local directory or "
            "s3://bucket/prefix); nothing was written"
        )
    parts = urlsplit(raw)
    if parts.username or parts.password or "@" in parts.netloc:
        raise ConfigError(  # the value is not shown: it holds a credential
            "SMALLCAPS_DATA_DIR holds credentials in its URL; give s3://bucket/prefix and set "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY instead; nothing was written"
        )
    if scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"SMALLCAPS_DATA_DIR={raw!r}: use s3://bucket/prefix; nothing was written")
    return "s3://" + parts.netloc + parts.path.rstrip("/")


def _budget_url(env: Mapping[str, str], home: str | None, data_dir: str) -> str:
    """``POLYGON_BUDGET_URL`` (``sqlite:///path`` or ``redis://host:port/db``); else
    ``POLYGON_BUDGET_PATH`` (the older spelling of a sqlite file); else a SQLite file under
    ``DAGSTER_HOME`` (else under the data directory's ``_state``): one host."""
    url = _text(env, "POLYGON_BUDGET_URL")
    if url:
        return url
    path = _text(env, "POLYGON_BUDGET_PATH")
    if not path:
        if home:
            state = Path(home)
        elif storage.is_remote(data_dir):  # SQLite cannot live in a bucket: this host's temp dir
            import tempfile

            state = Path(tempfile.gettempdir()) / "smallcaps_ingest"
        else:
            state = Path(data_dir) / "_state"
        path = str(state / "polygon_budget.sqlite")
    return "sqlite://" + os.path.abspath(path)
