"""Decode one v3 trades/quotes page (JSON) into a typed polars frame: :func:`parse_page`.

Two decoders, both native code that releases the GIL, so every core parses:

* polars' JSON reader on the page's rows alone, in pieces of about ``PIECE_BYTES`` cut between
  rows (``_read_pieces``). It takes the least CPU of the decoders measured, and cutting keeps
  its peak memory (several times its input, which its allocator then keeps) small. What is left
  of the page around the rows (a few hundred bytes) is read by stdlib ``json`` for ``next_url``.
* pyarrow's JSON reader on the whole page (``_read_arrow``), the fallback whenever the pieces do
  not parse: a cut that is not between two rows, or a ``}]`` that does not close the rows, leaves
  invalid JSON, so a piece is never silently wrong.

A whole-page polars read was the third decoder; it costs about twice the pieces' CPU and peaks
far higher, so pages without rows (the one case it served) are read by stdlib ``json`` instead.
The measured comparison is the decoder table of ``benchmarks/cost_per_tick.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import polars as pl
import pyarrow as pa
import pyarrow.json as pa_json

from smallcaps_ingest.core import shape

# The quote fields the 1 Hz grid keeps: at SMALLCAPS_QUOTES_HZ > 0 the others are not decoded.
NBBO_SCHEMA: dict[str, pl.DataType] = {
    k: shape.RAW_QUOTES_SCHEMA[k]
    for k in ("sip_timestamp", "sequence_number", "bid_price", "ask_price", "bid_size", "ask_size",
              "bid_exchange", "ask_exchange")
}
# polars parses a page in pieces of about this many bytes, cut between rows.
PIECE_BYTES = 256 << 10
_RESULTS = b'"results":['
_ROW_GAP = b"},{"
_ROWS_END = b"}]"
# Arrow's default jemalloc pool keeps freed pages for reuse; page frames are short-lived and
# sized all over the place, so the system pool keeps peak RSS down.
_POOL = pa.system_memory_pool()
_ARROW = {pl.Int64(): pa.int64(), pl.Int32(): pa.int32(), pl.Float64(): pa.float64(),
          pl.String(): pa.string(), pl.List(pl.Int32()): pa.list_(pa.int32())}


class PageDecodeError(ValueError):
    """A 200 body that is not a complete, valid v3 page (truncated or garbled); retried."""


@dataclass(frozen=True)
class _PageSchema:
    columns: dict[str, pl.DataType]
    arrow: pa.Schema

    @classmethod
    def of(cls, columns: dict[str, pl.DataType]) -> _PageSchema:
        row = pa.struct([pa.field(name, _ARROW[dtype]) for name, dtype in columns.items()])
        return cls(columns, pa.schema([("results", pa.list_(row)), ("next_url", pa.string())]))


_PAGE_SCHEMAS = {
    "trades": _PageSchema.of(shape.RAW_TRADES_SCHEMA),
    "quotes": _PageSchema.of(shape.RAW_QUOTES_SCHEMA),
    "nbbo": _PageSchema.of(NBBO_SCHEMA),
}


def _read_pieces(body: bytes, schema: _PageSchema) -> tuple[pl.DataFrame | None, str | None]:
    """polars' reader on the rows alone, in pieces of about ``PIECE_BYTES``.

    The rows run from ``"results":[`` to the last ``}]`` of the page. Each piece ends at a ``},{``
    between two rows and is read as a JSON array (never as a one-row frame holding a list of
    structs, whose explode costs CPU); what is left of the page (its object with an empty
    ``results``) is read on its own, so ``next_url`` is found wherever it sits. A cut that is not
    between two top-level rows (inside a string, or inside a nested object), or a ``}]`` that
    does not close the rows, leaves a piece with an open string or bracket or with text after its
    closing bracket, which is invalid JSON: the reader raises and ``parse_page`` reads the page
    whole with pyarrow instead.
    """
    start = body.find(_RESULTS) + len(_RESULTS)
    end = body.rfind(_ROWS_END) + 1  # just after the last row's closing brace
    view = memoryview(body)
    if start < len(_RESULTS) or end <= start:
        return None, _next_url(view, b"", rows_cut=False)  # no rows (or no array of them)
    frames: list[pl.DataFrame] = []
    at = start
    while end - at > PIECE_BYTES and (cut := body.find(_ROW_GAP, at + PIECE_BYTES, end)) >= 0:
        frames.append(pl.read_json(b"".join((b"[", view[at : cut + 1], b"]")), schema=schema.columns))
        at = cut + 2
    frames.append(pl.read_json(b"".join((b"[", view[at:end], b"]")), schema=schema.columns))
    rest = _next_url(view[:start], view[end:], rows_cut=True)
    return (pl.concat(frames) if len(frames) > 1 else frames[0]), rest


def _next_url(head: memoryview, tail: memoryview | bytes, *, rows_cut: bool) -> str | None:
    """``next_url`` of the page without its rows (a few hundred bytes: stdlib json is cheapest).

    ``rows_cut``: the rows were taken out, so ``results`` must be the empty array left behind;
    otherwise the page has no rows, and ``results`` may also be null or missing (an empty page).
    A page with rows that were not cut out (not written as ``"results":[``) raises, and pyarrow
    reads it whole."""
    try:
        page = json.loads(b"".join((head, tail)))
    except ValueError:
        raise PageDecodeError("invalid JSON around the rows") from None
    if not isinstance(page, dict) or page.get("results") not in (([],) if rows_cut else ([], None)):
        raise PageDecodeError("not one JSON object")
    next_url = page.get("next_url")
    if next_url is not None and not isinstance(next_url, str):
        raise PageDecodeError(f"next_url is not a string: {str(next_url)[:80]!r}")
    return next_url


def _read_arrow(body: bytes, schema: _PageSchema) -> tuple[pl.DataFrame | None, str | None]:
    page = pa_json.read_json(
        pa.py_buffer(body),
        # one block holds the whole object (a JSON object may not straddle blocks)
        read_options=pa_json.ReadOptions(use_threads=False, block_size=len(body) + 64),
        parse_options=pa_json.ParseOptions(explicit_schema=schema.arrow, unexpected_field_behavior="ignore"),
        memory_pool=_POOL,
    )
    if page.num_rows != 1:
        raise PageDecodeError("not one JSON object")
    results = page.column("results").chunk(0)
    if results.null_count or not len(results[0]):
        return None, page.column("next_url")[0].as_py()
    # zero-copy: the rows stay in the system pool instead of being copied by polars' allocator
    frame = pl.from_arrow(pa.RecordBatch.from_struct_array(results.flatten()))
    return frame, page.column("next_url")[0].as_py()  # type: ignore[return-value]


def parse_stream(
    kind: str, chunks: Iterable[bytes], nbbo_only: bool = False
) -> tuple[pl.DataFrame, str | None, int]:
    """As :func:`parse_page`, on a body read as it arrives: rows are decoded in pieces of about
    ``PIECE_BYTES`` as soon as they are in, so a page's body is never held whole (about a piece
    and a chunk of it at a time) and decoding overlaps the transfer. Also the body's bytes.

    The pieces are cut as in ``_read_pieces``; a cut that is not between two rows leaves invalid
    JSON and raises ``PageDecodeError``, and as the body is gone by then there is no whole-page
    fallback here: the client asks for the page again and reads it whole (``parse_page``). A page
    without ``"results":[`` (no rows) is small and read whole."""
    schema = _PAGE_SCHEMAS["nbbo" if kind == "quotes" and nbbo_only else kind]
    buf, head, frames, nbytes = bytearray(), b"", [], 0
    try:
        for chunk in chunks:
            nbytes += len(chunk)
            buf += chunk
            if not head:
                k = buf.find(_RESULTS)
                if k < 0:
                    continue
                head = bytes(buf[: k + len(_RESULTS)])
                del buf[: len(head)]
            while len(buf) > PIECE_BYTES and (cut := buf.find(_ROW_GAP, PIECE_BYTES)) >= 0:
                frames.append(pl.read_json(b"".join((b"[", buf[: cut + 1], b"]")), schema=schema.columns))
                del buf[: cut + 2]
        if not head:
            frame, next_url = parse_page(kind, bytes(buf), nbbo_only)
            return frame, next_url, nbytes
        end = 0 if not frames and buf.lstrip().startswith(b"]") else buf.rfind(_ROWS_END) + 1
        if end > 0:
            frames.append(pl.read_json(b"".join((b"[", buf[:end], b"]")), schema=schema.columns))
        elif frames or not buf.lstrip().startswith(b"]"):
            raise PageDecodeError(f"invalid {kind} page: its rows are not closed")
        next_url = _next_url(memoryview(head), buf[end:], rows_cut=True)
    except pl.exceptions.PolarsError as e:
        raise PageDecodeError(f"invalid {kind} page piece: {str(e)[:160]}") from None
    frame = pl.concat(frames) if len(frames) > 1 else frames[0] if frames else None
    return _finish(frame, schema), next_url, nbytes


def _finish(frame: pl.DataFrame | None, schema: _PageSchema) -> pl.DataFrame:
    if frame is None:
        return pl.DataFrame(schema=schema.columns)
    if frame.get_column("sip_timestamp").null_count() or frame.get_column("sequence_number").null_count():
        # the v3 API always sends both; a row without them sorts first and falls outside every window
        frame = frame.with_columns(pl.col("sip_timestamp", "sequence_number").fill_null(0))
    return frame


def parse_page(kind: str, body: bytes, nbbo_only: bool = False) -> tuple[pl.DataFrame, str | None]:
    """Decode one v3 page into a typed frame and its ``next_url`` (see the module docstring).

    Fields outside the schema are skipped; a missing or null ``results`` is an empty page.
    ``nbbo_only`` decodes just the quote fields the sampled grid keeps. Raises
    ``PageDecodeError`` on truncated or invalid JSON, which the client retries.
    """
    schema = _PAGE_SCHEMAS["nbbo" if kind == "quotes" and nbbo_only else kind]
    try:
        frame, next_url = _read_pieces(body, schema)
    except (pl.exceptions.PolarsError, PageDecodeError):
        try:
            frame, next_url = _read_arrow(body, schema)
        except (pa.ArrowInvalid, PageDecodeError) as e:
            raise PageDecodeError(f"invalid {kind} page ({len(body)} bytes): {str(e)[:160]}") from None
    return _finish(frame, schema), next_url
