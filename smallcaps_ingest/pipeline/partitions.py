"""The partitions of the ingest assets: one dynamic partition per symbol, registered by ``manifest``."""

import dagster as dg

symbols_partitions = dg.DynamicPartitionsDefinition(name="symbols")
