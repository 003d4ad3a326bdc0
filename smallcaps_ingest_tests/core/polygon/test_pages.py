"""The page decoders: fixtures of the real API, pieces cut between rows, and the fallback."""

from __future__ import annotations

import json

import polars as pl
import pytest

from smallcaps_ingest.core import shape
from smallcaps_ingest.core.polygon import pages
from smallcaps_ingest.core.polygon.client import PolygonClient
from smallcaps_ingest.core.polygon.pages import NBBO_SCHEMA, PageDecodeError, parse_page
from smallcaps_ingest_tests.conftest import FIXTURES, ns


def test_fixture_payloads_parse(page_reader: str) -> None:
    trades, nxt = parse_page("trades", (FIXTURES / "v3/trades/AAPL&limit=2.json").read_bytes())
    assert nxt is None and trades.height == 2
    assert trades.schema == pl.Schema(shape.RAW_TRADES_SCHEMA)
    row = trades.row(0, named=True)
    assert row["conditions"] == [12, 37] and row["id"] == "183276" and row["trf_id"] == 3
    assert row["correction"] == 1 and row["sip_timestamp"] == 1651181822461979400 and row["size"] == 10.0
    page1, next1 = parse_page("quotes", (FIXTURES / "v3/quotes/AAPL.json").read_bytes())
    cursor_file = next((FIXTURES / "v3/quotes").glob("AAPL&cursor=*.json"))
    page2, next2 = parse_page("quotes", cursor_file.read_bytes())
    assert next1 is not None and "cursor=" in next1 and next2 is None
    assert page1.height == page2.height == 10
    both = pl.concat([page1, page2])
    assert both["sequence_number"].n_unique() == 20
    assert page1["sequence_number"].min() > page2["sequence_number"].max()  # desc pages
    for name in (
        "openapi-examples/v3_trades_stockTicker_200.json",
        "openapi-examples/v3_quotes_stockTicker_200.json",
    ):
        kind = "trades" if "trades" in name else "quotes"
        df, nxt = parse_page(kind, (FIXTURES / name).read_bytes())
        assert df.height == 2 and nxt
    # shaping the fixture trades gives the documented schema
    shaped = shape.shape_trades(trades, 0, 2**62)
    assert shaped.schema == pl.Schema(shape.TRADES_SCHEMA)
    assert parse_page("trades", b'{"status":"OK","request_id":"x"}')[0].height == 0  # results missing


@pytest.fixture(params=["one-piece", "pieces", "pyarrow"])
def page_reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a parse test through each way ``parse_page`` reads a page: polars on the rows in one
    piece, polars on pieces cut between rows (tiny pieces here, so every page is cut many times),
    and pyarrow, the fallback."""
    if request.param == "one-piece":
        monkeypatch.setattr(pages, "PIECE_BYTES", 1 << 40)
    elif request.param == "pieces":
        monkeypatch.setattr(pages, "PIECE_BYTES", 64)
    else:
        def fail(body: bytes, schema: object) -> None:
            raise pl.exceptions.ComputeError("polars refused the page")

        monkeypatch.setattr(pages, "_read_pieces", fail)
    return str(request.param)


def _trades_body(ids: list[str], nested: bool) -> bytes:
    rows = []
    for i, tid in enumerate(ids):
        extra = ',"nested":{"list":[{"a":1},{"b":[{"c":2},{"d":3}]}]}' if nested and i % 3 == 0 else ""
        rows.append(f'{{"sip_timestamp":{1_700_000_000_000_000_000 + i},"sequence_number":{i + 1},'
                    f'"price":{i}.5,"size":{i},"conditions":[{i},1],"id":"{tid}"{extra}}}')
    return ('{"status":"OK","next_url":"http://h/v3?cursor=c","results":[' + ",".join(rows)
            + '],"request_id":"r"}').encode()


def test_parse_page_pieces_never_cut_inside_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows whose strings hold the cut marker (``},{``), escaped quotes and nested objects: at every
    piece size the frame equals pyarrow's whole-page read. A wrong cut must fall back, never
    return other rows; a body cut short stays an error."""
    ids = ["7", "a},{b", 'q\\"},{\\"', "}", "{", "x},{"]
    body = _trades_body([ids[i % len(ids)] for i in range(40)], nested=True)
    want, want_next = pages._read_arrow(body, pages._PAGE_SCHEMAS["trades"])
    assert want is not None and want.height == 40 and want_next == "http://h/v3?cursor=c"
    assert {"a},{b", 'q"},{"', "x},{"} <= set(want["id"].to_list())  # the marker inside strings
    for size in range(1, len(body) + 2, 7):
        monkeypatch.setattr(pages, "PIECE_BYTES", size)
        got, nxt = parse_page("trades", body)
        assert got.equals(want) and nxt == want_next, size
        with pytest.raises(PageDecodeError):
            parse_page("trades", body[: len(body) // 2 + size % 97])
    # plain rows are read in pieces at every size, never by the fallback
    clean = _trades_body([str(i) for i in range(40)], nested=False)
    fallbacks: list[int] = []
    arrow = pages._read_arrow
    monkeypatch.setattr(pages, "_read_arrow", lambda b, sch: fallbacks.append(len(b)) or arrow(b, sch))
    whole = arrow(clean, pages._PAGE_SCHEMAS["trades"])[0]
    assert whole is not None and whole.height == 40
    for size in range(1, len(clean) + 2, 5):
        monkeypatch.setattr(pages, "PIECE_BYTES", size)
        assert parse_page("trades", clean)[0].equals(whole)
    assert fallbacks == [], fallbacks


def test_parse_page_finds_the_rows_end_and_next_url_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows are read up to the page's last ``}]``. When that mark sits in a later field (here a
    string), the rows piece is invalid and pyarrow reads the page whole: the frame is still right.
    A body cut short after its rows, or with text after its object, stays an error."""
    rows = _trades_body([str(i) for i in range(12)], nested=False)
    want, _ = pages._read_arrow(rows, pages._PAGE_SCHEMAS["trades"])
    assert want is not None and want.height == 12
    fallbacks: list[int] = []
    arrow = pages._read_arrow
    monkeypatch.setattr(pages, "_read_arrow", lambda b, sch: fallbacks.append(len(b)) or arrow(b, sch))
    inner = rows[rows.index(b'"results":[') : rows.rindex(b"]") + 1]
    for body, n_fallbacks in (
        (b'{"next_url":"http://h/n","status":"OK",' + inner + b"}", 0),  # next_url first
        (b"{" + inner + b',"next_url":"http://h/n","status":"OK"}', 0),  # next_url last
        (b"{" + inner + b',"request_id":"r}]x","next_url":"http://h/n"}', 1),  # a "}]" after the rows
    ):
        got, nxt = parse_page("trades", body)
        assert got.equals(want) and nxt == "http://h/n", body[-60:]
        assert len(fallbacks) == n_fallbacks, body[-60:]
        fallbacks.clear()
    for bad in (b"{" + inner + b',"next_url":"http://h', b"{" + inner + b"}}", b"{" + inner + b"} x",
                b"{" + inner + b',"next_url":7}'):
        with pytest.raises(PageDecodeError, match="invalid trades page"):
            parse_page("trades", bad)


def test_parse_page_edge_cases_and_errors(page_reader: str) -> None:
    body = (b'{"results":[{"sip_timestamp":1517562000015577088,"price":5,"size":100,"conditions":[1,2],'
            b'"id":"7","sequence_number":3,"unknown_field":{"a":[1]}}],"next_url":"http://h/v3?cursor=c",'
            b'"status":"OK","request_id":"r"}')
    df, nxt = parse_page("trades", body)
    assert nxt == "http://h/v3?cursor=c" and df.schema == pl.Schema(shape.RAW_TRADES_SCHEMA)
    row = df.row(0, named=True)
    # integers in float columns are widened; a nanosecond stamp above 2**53 stays exact
    assert row["price"] == 5.0 and row["size"] == 100.0 and row["sip_timestamp"] == 1517562000015577088
    assert row["conditions"] == [1, 2] and row["tape"] is None
    for empty in (b'{"results":[]}', b'{"results":null}', b'{"status":"OK"}'):
        frame, nxt = parse_page("quotes", empty, nbbo_only=True)
        assert frame.height == 0 and nxt is None and frame.schema == pl.Schema(NBBO_SCHEMA)
    quotes = (b'{"results":[{"sip_timestamp":2,"sequence_number":9,"bid_price":1.5,"ask_price":1.6,'
              b'"indicators":[4]}]}')
    slim, _ = parse_page("quotes", quotes, nbbo_only=True)
    assert slim.columns == list(NBBO_SCHEMA) and slim.row(0)[:4] == (2, 9, 1.5, 1.6)
    full, _ = parse_page("quotes", quotes)
    assert full.row(0, named=True)["indicators"] == [4]
    for bad in (body[:57], b"", b"<html>502</html>", b"[1,2]", b'{"results":[{"sip_timestamp":"x"}]}',
                b'{"results":[]}\n{"results":[]}'):
        with pytest.raises(PageDecodeError, match="invalid trades page"):
            parse_page("trades", bad)


def test_parse_page_matches_stdlib_json_on_a_simulator_page(client: PolygonClient, page_reader: str) -> None:
    url = f"{client.base_url}/v3/trades/AAOI"
    resp = client.session.get(url, params={"timestamp.gte": ns("2024-03-05T15:00:00Z"),
                                           "timestamp.lt": ns("2024-03-05T15:10:00Z"), "order": "asc",
                                           "limit": 50000}, timeout=30)
    rows = json.loads(resp.content)["results"]
    df, _ = parse_page("trades", resp.content)
    assert df.height == len(rows) > 100
    for col in shape.RAW_TRADES_SCHEMA:
        want = [r.get(col) for r in rows]
        got = df[col].to_list()
        assert got == [float(w) if isinstance(w, int) and col in ("price", "size") else w for w in want], col


def _chunked(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def test_parse_stream_equals_the_whole_page_at_every_chunk_and_piece_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Decoded as it streams in, a page gives the frame, ``next_url`` and byte count of the
    whole-page read, whatever the chunks and pieces (next_url before or after the rows, no rows,
    no results at all). A cut inside a string (the marker ``},{`` in an id) never yields other
    rows: the page either decodes right or raises ``PageDecodeError`` (the client then reads it
    whole); a body cut short raises."""
    clean = _trades_body([str(i) for i in range(40)], nested=False)
    inner = clean[clean.index(b'"results":[') : clean.rindex(b"]") + 1]
    bodies = [clean, b'{"next_url":"http://h/n",' + inner + b',"status":"OK"}',
              b'{"status":"OK","results":[],"next_url":"http://h/e"}', b'{"status":"OK"}']
    for body in bodies:
        want, want_next = parse_page("trades", body)
        for piece in (1, 64, 300, 1 << 20):
            monkeypatch.setattr(pages, "PIECE_BYTES", piece)
            for chunk in (1, 7, 256, len(body)):
                got, nxt, n = pages.parse_stream("trades", _chunked(body, chunk))
                assert got.equals(want) and nxt == want_next and n == len(body), (piece, chunk)
    ids = ["7", "a},{b", 'q\\"},{\\"', "}", "{", "x},{"]
    outcomes = set()
    for tricky in (_trades_body([ids[i % len(ids)] for i in range(40)], nested=False),
                   _trades_body([str(i) for i in range(40)], nested=True)):  # "},{" in nested objects
        want, _ = parse_page("trades", tricky)
        for piece in range(1, 400, 13):
            monkeypatch.setattr(pages, "PIECE_BYTES", piece)
            try:
                got, _, _ = pages.parse_stream("trades", _chunked(tricky, 97))
            except PageDecodeError:
                outcomes.add("raised")
            else:
                assert got.equals(want), piece
                outcomes.add("equal")
            with pytest.raises(PageDecodeError):
                pages.parse_stream("trades", _chunked(clean[: len(clean) // 2 + piece], 97))
    assert outcomes == {"raised", "equal"}
