"""storage.py on S3 (moto's server on loopback): the tree's scanner, the first-writer-wins source
record, densities written whole by two writers, and no temporary object ever."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest

from smallcaps_ingest import layout, storage
from smallcaps_ingest.core import store
from smallcaps_ingest.core.density import DensityStore
from smallcaps_ingest_tests.conftest import ns
from smallcaps_ingest_tests.s3_helpers import list_keys, moto_s3, new_bucket


@pytest.fixture(scope="module")
def s3_server() -> Iterator[dict[str, str]]:
    with moto_s3() as env:
        yield env


@pytest.fixture
def tree(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """(an s3:// data dir in a new bucket, the bucket)."""
    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    storage._s3.cache_clear()
    bucket = new_bucket(s3_server)
    yield f"s3://{bucket}/tree", bucket
    storage._s3.cache_clear()


def test_the_scanner_sees_complete_partial_and_no_orphans(tree: tuple[str, str], s3_server: dict) -> None:
    data, bucket = tree
    for sym, eid, files in [("AAA", "e1", store.FILES), ("AAA", "e2", store.FILES[:1]),
                            ("BBB", "e3", store.FILES), ("BBB", "e4", store.FILES)]:
        for f in files:
            store.atomic_write_bytes(b"x" * 10, store.event_dir(data, sym, eid) / f)
    storage.write_bytes(f"{data}/event_windows/symbol=AAA/stray.json", b"{}")  # not an event
    scan = layout.scan_tree(data, detail=True)
    assert sorted(scan.symbols) == ["AAA", "BBB"]
    assert (scan.symbols["AAA"].complete, scan.symbols["AAA"].partial) == ({"e1"}, {"e2"})
    assert scan.symbols["BBB"].complete == {"e3", "e4"} and not scan.symbols["BBB"].partial
    assert (scan.files, scan.bytes, scan.all_orphans()) == (7, 70, [])
    assert set(scan.symbols["BBB"].stats or {}) == {"e3", "e4"}
    one = store.scan_symbol(data, "AAA")
    assert (one.complete, one.partial, one.files) == ({"e1"}, {"e2"}, 3)
    assert [s for s, _ in layout.list_symbol_dirs(data)[0]] == ["AAA", "BBB"]
    assert store.complete_events(data, ["AAA", "BBB", "ZZZ"]) == {
        "AAA": {"e1"}, "BBB": {"e3", "e4"}, "ZZZ": frozenset()}
    assert layout.tmp_files_in(data) == []
    keys = list_keys(s3_server, bucket)
    assert len(keys) == 8 and not [k for k in keys if store.TMP_MARK in k]  # one PUT each, no tmp


def test_the_source_record_goes_to_the_first_writer(tree: tuple[str, str]) -> None:
    data, _ = tree
    path = storage.join(data, layout.SOURCE_FILE)
    assert storage.create_bytes(path, b'{"source": "a"}') is True
    assert storage.create_bytes(path, b'{"source": "b"}') is False  # conditional PUT refused
    assert json.loads(storage.read_bytes(path)) == {"source": "a"}
    store.check_source(data, "a")
    with pytest.raises(store.SourceMismatchError, match="holds data from source 'a'"):
        store.check_source(data, "b")


def test_two_first_runs_racing_one_source_wins(tree: tuple[str, str]) -> None:
    data, _ = tree
    errors: dict[str, BaseException | None] = {}
    barrier = threading.Barrier(2)

    def run(source: str) -> None:
        barrier.wait()
        try:
            store.check_source(data, source)
            errors[source] = None
        except store.SourceMismatchError as e:
            errors[source] = e

    threads = [threading.Thread(target=run, args=(s,)) for s in ("polygon", "simulator")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = json.loads(storage.read_bytes(f"{data}/_source.json"))["source"]
    assert errors[winner] is None and isinstance(errors[{"polygon", "simulator"}.difference({winner}).pop()],
                                                 store.SourceMismatchError)


def test_densities_from_two_writers_are_never_torn(tree: tuple[str, str]) -> None:
    data, _ = tree
    path = storage.join(data, layout.STATE_DIR, layout.DENSITY_FILE)
    start = ns("2024-03-05T15:00:00")
    stores = [DensityStore(path), DensityStore(path)]
    for i, d in enumerate(stores):
        d.observe(f"S{i}", "trades", start, start + 60 * 10**9, 100 * (i + 1))
    barrier = threading.Barrier(2)

    def save(d: DensityStore) -> None:
        barrier.wait()
        d.save()

    threads = [threading.Thread(target=save, args=(d,)) for d in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    on_s3 = json.loads(storage.read_bytes(path))  # whole JSON: one writer's merge, or both
    assert set(on_s3) in ({"S0"}, {"S1"}, {"S0", "S1"})
    fresh = DensityStore(path)
    assert fresh.known(next(iter(on_s3)))
    stores[0].observe("S0", "trades", start, start + 60 * 10**9, 50)
    stores[0].save()  # a later save merges into what is there
    assert "S0" in json.loads(storage.read_bytes(path))


def test_local_paths_keep_their_shape(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert storage.join(str(tmp_path), "a", "b") == f"{tmp_path}/a/b"
    assert storage.join("s3://b/p/", "a") == "s3://b/p/a"
    assert type(layout.windows_root(tmp_path)).__name__ == "PosixPath"
    assert str(layout.event_dir("s3://b/p", "AAA", "e1")) == "s3://b/p/event_windows/symbol=AAA/event=e1"
    assert storage.absolute("s3://b/p/") == "s3://b/p" and not storage.is_remote(tmp_path)


def test_doctor_checks_the_bucket(tree: tuple[str, str], s3_server: dict) -> None:
    from smallcaps_ingest.ops.doctor import check_data_dir

    data, bucket = tree
    first = check_data_dir(data, "polygon")
    assert first.ok and "writable, no _source.json yet" in first.detail, first
    store.check_source(data, "polygon")
    assert check_data_dir(data, "polygon").ok
    other = check_data_dir(data, "simulator")
    assert not other.ok and "holds data from 'polygon'" in other.detail
    assert set(list_keys(s3_server, bucket)) == {"tree/_source.json"}  # the probe object is gone
    missing = check_data_dir("s3://no-such-bucket-smallcaps/tree", "polygon")
    assert not missing.ok and "is not writable" in missing.detail
