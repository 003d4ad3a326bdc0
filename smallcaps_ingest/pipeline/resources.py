"""Dagster resources: the Polygon client (pooled session + shared budget), its simulated twin,
the settings, and the atomic Parquet IO manager. ``definitions.py`` picks the Polygon implementation
from ``Config.is_simulator``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import dagster as dg
import polars as pl
from dagster_polars import PolarsParquetIOManager
from pydantic import PrivateAttr
from upath import UPath

from smallcaps_ingest import storage
from smallcaps_ingest.config import OFFICIAL_BASE_URL, SIMULATOR, SIMULATOR_KEY, ConfigError
from smallcaps_ingest.core.polygon.budget import open_budget
from smallcaps_ingest.core.polygon.client import PolygonAuthError, PolygonClient
from smallcaps_ingest.core.store import atomic_write_parquet
from smallcaps_ingest.simulator import Simulator


class AtomicPolarsParquetIOManager(PolarsParquetIOManager):
    """dagster-polars' Parquet IO manager, but a write never leaves a half-written manifest:
    the frame goes to a temporary file beside the target, is fsynced, and replaces it; on S3 it is
    one PUT of the whole object. Both ways go through the package's filesystem layer
    (``storage.py``), which reads S3 with the AWS_* variables botocore reads itself."""

    def write_df_to_path(self, context: dg.OutputContext, df: pl.DataFrame, path: UPath) -> None:  # type: ignore[override]
        if getattr(path, "protocol", "") not in ("", "file", "local", "s3"):
            return super().write_df_to_path(context, df, path)
        atomic_write_parquet(df, Path(str(path)) if not storage.is_remote(path) else path)
        return None

    def scan_df_from_path(  # type: ignore[override]
        self, path: UPath, context: dg.InputContext, partition_key: str | None = None
    ) -> pl.LazyFrame:
        if not storage.is_remote(path):
            return super().scan_df_from_path(path, context, partition_key)
        return pl.read_parquet(storage.source(path)).lazy()


class PolygonResource(dg.ConfigurableResource):
    """The Polygon/Massive v3 API: one pooled session and the host-wide request budget."""

    api_key: str | None = None
    base_url: str = OFFICIAL_BASE_URL
    max_rps: float = 90.0
    workers: int = 12
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    # The shared request budget (see budget.open_budget): Config.budget_url.
    budget_url: str = ""
    budget_timeout: float = 120.0  # seconds the budget may be unreachable before the run fails

    _client: PolygonClient | None = PrivateAttr(default=None)
    _on_teardown: list[Callable[[], None]] = PrivateAttr(default_factory=list)

    def preflight(self) -> None:
        """Fail before any request when no key is set."""
        if not self.api_key:
            raise PolygonAuthError(
                "POLYGON_API_KEY is not set. Set it to your Polygon/Massive key (trades need Stocks "
                "Developer, quotes Stocks Advanced), or set POLYGON_BASE_URL=simulator to use the bundled "
                "simulator. No request was made."
            )

    def endpoint(self) -> tuple[str, str]:
        """The base URL and key the client talks to."""
        return self.base_url, self.api_key or ""

    def source(self) -> str:
        """What the tree records as its source (``_source.json``): the two never mix."""
        return "polygon"

    def get_client(self) -> PolygonClient:
        if self._client is None:
            self.preflight()
            if not self.budget_url:
                raise ConfigError("PolygonResource.budget_url is not set (Config.from_env() sets it)")
            base, key = self.endpoint()
            budget = open_budget(
                self.budget_url, self.max_rps, bucket=urlsplit(base).netloc or base,
                unavailable_timeout=self.budget_timeout,
            )
            self._client = PolygonClient(
                base,
                key,
                budget,
                source=self.source(),
                workers=self.workers,
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
            )
        return self._client

    def on_teardown(self, stop: Callable[[], None]) -> None:
        """Call ``stop`` when the step's resources are torn down, before the client is closed: the
        step may have ended (an interrupt) without its asset's code running again."""
        self._on_teardown.append(stop)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        while self._on_teardown:
            self._on_teardown.pop()()
        if self._client is not None:
            self._client.close()
            self._client.budget.close()
            self._client = None


class SimulatedPolygonResource(PolygonResource):
    """The same resource against the bundled simulator, started in this process when the step
    first needs a client (``POLYGON_BASE_URL=simulator``; any key, or none, is accepted)."""

    base_url: str = SIMULATOR

    _simulator: Simulator | None = PrivateAttr(default=None)

    def preflight(self) -> None:
        """The simulator needs no key."""

    def source(self) -> str:
        return SIMULATOR

    def endpoint(self) -> tuple[str, str]:
        self._simulator = Simulator().start()
        return self._simulator.base_url, self.api_key or SIMULATOR_KEY

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        super().teardown_after_execution(context)
        if self._simulator is not None:
            self._simulator.stop()
            self._simulator = None


class IngestSettings(dg.ConfigurableResource):
    """Where things are and how quotes are shaped (from ``Config``)."""

    data_dir: str = "./data"
    events_path: str = ""
    quotes_hz: float = 1.0
    max_overfetch: float = 4.0
    # rows a merged range may fetch beyond what its events need; None: from the budget's rate
    overfetch_rows: int | None = None
