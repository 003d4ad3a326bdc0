# Two entry points that work on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME := $(CURDIR)/dagster_home

.PHONY: demo test install lint bench clean-demo

$(BIN)/dagster: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/dagster

# The main job end-to-end on the bundled simulator: manifest, then every symbol in one run, the
# ingestion report, then status.
demo: install
	POLYGON_BASE_URL=simulator $(BIN)/dagster asset materialize -m smallcaps_ingest --select manifest
	POLYGON_BASE_URL=simulator $(BIN)/dagster asset materialize -m smallcaps_ingest --select event_windows \
		--partition-range "$$($(BIN)/smallcaps-ingest partition-range)"
	POLYGON_BASE_URL=simulator $(BIN)/dagster asset materialize -m smallcaps_ingest --select ingestion_report
	$(BIN)/smallcaps-ingest status

test: install
	$(BIN)/pytest -q smallcaps_ingest_tests

lint: install
	$(BIN)/ruff check smallcaps_ingest smallcaps_ingest_tests benchmarks

bench: install
	$(BIN)/python benchmarks/throughput.py
