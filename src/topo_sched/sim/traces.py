"""Request traces: real LLM request arrivals with prompt and output lengths.

Two formats are read:

Azure LLM inference trace 2023 (CSV)
    Header ``TIMESTAMP,ContextTokens,GeneratedTokens`` (columns found by name, any order,
    extra columns ignored), timestamps like ``2023-11-16 18:17:03.9799600``. The fraction has
    7 digits (100 ns), more than :mod:`datetime` keeps, so timestamps are parsed to integer
    nanoseconds and only then made relative to the first one: distinct timestamps keep their
    order exactly. The last line may lack a newline.
Mooncake FAST'25 traces (JSONL)
    One object per line: ``timestamp`` (milliseconds, already relative to the trace start),
    ``input_length``, ``output_length``, ``hash_ids`` (prefix-cache block ids; ignored, prefix
    caching is not modelled).

Blank lines are ignored. A line that cannot be read is skipped and reported in
:attr:`Trace.skipped` (``"line 17: GeneratedTokens 'x' is not an integer"``), the first
``max_listed`` of them, with :attr:`Trace.skipped_count` counting all. A source with no usable
line, or in neither format, raises :class:`TraceError` naming it and saying why. A prompt or
output length of 0 counts as 1 (every request holds at least one token and yields one).

Requests are sorted by arrival (ties keep file order) and numbered 0.. in that order, so ids
and arrival order agree. The two Azure files ship with the package (see
``topo_sched/data/traces/README.md`` for their source and CC-BY 4.0 attribution) and load by
name: ``load_trace("azure-code")``, ``load_trace("azure-conv")``. Other traces, Mooncake
included, load by path.

Pure apart from :func:`load_trace`, which reads a file or a bundled resource.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gzip
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

#: Skipped lines listed by name in a Trace (the rest are only counted).
MAX_LISTED = 20

#: Bundled traces: name -> file in ``topo_sched/data/traces/``.
BUNDLED: dict[str, str] = {
    "azure-code": "AzureLLMInferenceTrace_code.csv",
    "azure-conv": "AzureLLMInferenceTrace_conv.csv",
}

TraceFormat = Literal["azure-csv", "mooncake-jsonl"]

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


class TraceError(ValueError):
    """A trace that cannot be used at all: unreadable, unknown format, no usable line."""


@dataclass(frozen=True)
class Request:
    id: int
    #: Seconds after the trace start.
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Trace:
    name: str
    requests: list[Request]
    #: What could not be read, "line N: why", at most MAX_LISTED entries.
    skipped: list[str] = field(default_factory=list)
    #: Where it came from (a path, or "bundled:<name> (<upstream path>)").
    source: str = ""
    #: Lines skipped in all (``skipped`` lists only the first few).
    skipped_count: int = 0
    format: str = ""

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration_s(self) -> float:
        """Arrival of the last request (the first arrives at or after 0)."""
        return self.requests[-1].arrival_s if self.requests else 0.0

    def compress(self, factor: float) -> Trace:
        """The same requests arriving ``factor`` times faster (arrival times divided by it)."""
        if not (factor > 0 and math.isfinite(factor)):
            raise ValueError(f"compress factor must be a positive number, got {factor!r}")
        reqs = [replace(r, arrival_s=r.arrival_s / factor) for r in self.requests]
        return replace(self, requests=reqs)

    def window(self, start_s: float, duration_s: float | None = None) -> Trace:
        """Requests arriving in ``[start_s, start_s + duration_s)``, re-based so ``start_s`` is 0.

        Ids are kept (they stay unique and in arrival order). ``duration_s=None``: to the end.
        """
        if duration_s is not None and duration_s < 0:
            raise ValueError(f"window duration must be >= 0, got {duration_s!r}")
        end = math.inf if duration_s is None else start_s + duration_s
        reqs = [
            replace(r, arrival_s=r.arrival_s - start_s)
            for r in self.requests
            if start_s <= r.arrival_s < end
        ]
        return replace(self, requests=reqs)

    def skipped_summary(self) -> str:
        """One line: how many were skipped, and the first reasons."""
        if not self.skipped_count:
            return "no lines skipped"
        more = self.skipped_count - len(self.skipped)
        tail = f"; and {more} more" if more > 0 else ""
        return f"{self.skipped_count} line(s) skipped: " + "; ".join(self.skipped) + tail


# -- parsing helpers ------------------------------------------------------------------------


class _Skips:
    def __init__(self, max_listed: int) -> None:
        self.listed: list[str] = []
        self.count = 0
        self.max_listed = max_listed

    def add(self, lineno: int, why: str) -> None:
        self.count += 1
        if len(self.listed) < self.max_listed:
            self.listed.append(f"line {lineno}: {why}")


def _lines(text: str | Iterable[str]) -> Iterable[tuple[int, str]]:
    """(1-based line number, line without its end) pairs, BOM stripped from the first line."""
    it = text.splitlines() if isinstance(text, str) else text
    for n, line in enumerate(it, start=1):
        line = line.rstrip("\r\n")
        if n == 1:
            line = line.lstrip("\ufeff")
        yield n, line


def _count(value: object, what: str) -> int:
    """A token count: a non-negative integer (0 counts as 1). Raises ValueError with a reason."""
    if isinstance(value, bool):
        raise ValueError(f"{what} {value!r} is not an integer")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise ValueError(f"{what} {value!r} is not an integer")
        n = int(value)
    elif isinstance(value, str):
        s = value.strip()
        if not re.fullmatch(r"[+-]?\d+", s):
            raise ValueError(f"{what} {value!r} is not an integer")
        n = int(s)
    else:
        raise ValueError(f"{what} {value!r} is not an integer")
    if n < 0:
        raise ValueError(f"{what} {n} is negative")
    return max(1, n)


_TS = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:?\d{2})?"
)


@lru_cache(maxsize=64)
def _ordinal(y: int, mo: int, d: int) -> int:
    return _dt.date(y, mo, d).toordinal()


def _timestamp_ns(s: str) -> int:
    """``YYYY-MM-DD HH:MM:SS[.fffffffff]`` as integer nanoseconds (naive = as written)."""
    m = _TS.fullmatch(s.strip())
    if not m:
        raise ValueError(f"TIMESTAMP {s!r} is not a timestamp (YYYY-MM-DD HH:MM:SS[.fraction])")
    y, mo, d, h, mi, sec = (int(g) for g in m.groups()[:6])
    try:
        day = _ordinal(y, mo, d)
        if h > 23 or mi > 59 or sec > 59:
            raise ValueError("hour, minute or second out of range")
    except ValueError as e:
        raise ValueError(f"TIMESTAMP {s!r} is not a valid date/time ({e})") from None
    frac = (m.group(7) or "").ljust(9, "0")
    offset = 0
    tz = m.group(8)
    if tz and tz != "Z":
        sign = -1 if tz[0] == "-" else 1
        digits = tz[1:].replace(":", "")
        offset = sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    secs = day * 86400 + h * 3600 + mi * 60 + sec - offset
    return secs * 1_000_000_000 + int(frac)


def _finish(
    rows: list[tuple[float, int, int]],
    skips: _Skips,
    *,
    name: str,
    source: str,
    fmt: str,
) -> Trace:
    if not rows:
        why = (
            f"no usable request line ({skips.count} skipped, first: {skips.listed[0]})"
            if skips.count
            else "no request lines"
        )
        raise TraceError(f"{source}: {why}")
    order = sorted(range(len(rows)), key=lambda i: rows[i][0])  # stable: ties keep file order
    reqs = [Request(i, rows[j][0], rows[j][1], rows[j][2]) for i, j in enumerate(order)]
    return Trace(
        name=name,
        requests=reqs,
        skipped=skips.listed,
        source=source,
        skipped_count=skips.count,
        format=fmt,
    )


# -- Azure CSV ------------------------------------------------------------------------------


def parse_azure_csv(
    text: str | Iterable[str],
    *,
    name: str = "azure",
    source: str = "<azure csv>",
    max_listed: int = MAX_LISTED,
) -> Trace:
    """An Azure LLM inference trace (2023/2024 CSV). Arrivals relative to the earliest one."""
    skips = _Skips(max_listed)
    numbered = ((n, line) for n, line in _lines(text) if line.strip())
    first = next(numbered, None)
    if first is None:
        raise TraceError(f"{source}: empty, no header line")
    header = [h.strip() for h in next(csv.reader([first[1]]))]
    lower = [h.lower() for h in header]
    try:
        cols = [lower.index(c.lower()) for c in AZURE_COLUMNS]
    except ValueError:
        raise TraceError(
            f"{source}: line {first[0]}: header {first[1]!r} lacks the Azure LLM trace columns "
            f"{','.join(AZURE_COLUMNS)}"
        ) from None
    width = len(header)
    raw: list[tuple[int, int, int]] = []
    for lineno, fields in _csv_rows(numbered):
        if len(fields) != width:
            skips.add(lineno, f"expected {width} fields, got {len(fields)}")
            continue
        try:
            ts = _timestamp_ns(fields[cols[0]])
            prompt = _count(fields[cols[1]], header[cols[1]])
            out = _count(fields[cols[2]], header[cols[2]])
        except ValueError as e:
            skips.add(lineno, str(e))
            continue
        raw.append((ts, prompt, out))
    t0 = min((r[0] for r in raw), default=0)
    rows = [((ts - t0) / 1e9, p, o) for ts, p, o in raw]
    return _finish(rows, skips, name=name, source=source, fmt="azure-csv")


def _csv_rows(numbered: Iterable[tuple[int, str]]) -> Iterable[tuple[int, list[str]]]:
    for lineno, line in numbered:
        if '"' not in line:
            yield lineno, line.split(",")  # the common case, without csv's per-call cost
            continue
        try:
            fields = next(csv.reader([line]))
        except csv.Error as e:  # pragma: no cover - csv rarely raises on one line
            fields = [f"<{e}>"]
        yield lineno, fields


# -- Mooncake JSONL -------------------------------------------------------------------------


def parse_mooncake_jsonl(
    text: str | Iterable[str],
    *,
    name: str = "mooncake",
    source: str = "<mooncake jsonl>",
    max_listed: int = MAX_LISTED,
) -> Trace:
    """A Mooncake trace: ``timestamp`` in ms (kept as the trace's own relative clock)."""
    skips = _Skips(max_listed)
    rows: list[tuple[float, int, int]] = []
    for lineno, line in _lines(text):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            skips.add(lineno, f"not JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            skips.add(lineno, "not a JSON object")
            continue
        try:
            for key in ("timestamp", "input_length", "output_length"):
                if key not in obj:
                    raise ValueError(f"no {key!r}")
            ts = obj["timestamp"]
            if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
                raise ValueError(f"timestamp {ts!r} is not a number")
            if ts < 0:
                raise ValueError(f"timestamp {ts!r} is negative")
            prompt = _count(obj["input_length"], "input_length")
            out = _count(obj["output_length"], "output_length")
        except ValueError as e:
            skips.add(lineno, str(e))
            continue
        rows.append((ts / 1000.0, prompt, out))
    return _finish(rows, skips, name=name, source=source, fmt="mooncake-jsonl")


# -- detection and loading ------------------------------------------------------------------


def detect_trace_format(text: str | Iterable[str], source: str = "<text>") -> TraceFormat:
    """Which parser reads this, from its first non-blank line; TraceError if neither."""
    for lineno, line in _lines(text):
        s = line.strip()
        if not s:
            continue
        if s.startswith("{"):
            return "mooncake-jsonl"
        cols = {c.strip().lower() for c in s.split(",")}
        if all(c.lower() in cols for c in AZURE_COLUMNS):
            return "azure-csv"
        shown = s if len(s) <= 80 else s[:77] + "..."
        raise TraceError(
            f"{source}: unknown trace format: line {lineno} ({shown!r}) is neither an Azure LLM "
            f"trace header ({','.join(AZURE_COLUMNS)}) nor a Mooncake JSON object "
            "(timestamp, input_length, output_length)"
        )
    raise TraceError(f"{source}: empty, nothing to read")


def parse_trace(
    text: str,
    *,
    name: str = "trace",
    source: str = "<text>",
    max_listed: int = MAX_LISTED,
) -> Trace:
    fmt = detect_trace_format(text, source)
    parse = parse_azure_csv if fmt == "azure-csv" else parse_mooncake_jsonl
    return parse(text, name=name, source=source, max_listed=max_listed)


def bundled_trace_text(name: str) -> str:
    """The text of a bundled trace (``azure-code`` / ``azure-conv``), unmodified."""
    try:
        fname = BUNDLED[name]
    except KeyError:
        raise TraceError(
            f"no bundled trace {name!r}; bundled: {', '.join(sorted(BUNDLED))}"
        ) from None
    res = resources.files("topo_sched").joinpath("data", "traces", fname)
    return res.read_bytes().decode("utf-8")


def load_trace(spec: str | Path, *, max_listed: int = MAX_LISTED) -> Trace:
    """A trace by bundled name (``azure-code``, ``azure-conv``) or by file path (``.gz`` too).

    A name that is also an existing file's path loads the file.
    """
    path = Path(spec)
    if isinstance(spec, str) and spec in BUNDLED and not path.exists():
        text = bundled_trace_text(spec)
        source = f"bundled:{spec} (Azure/AzurePublicDataset data/{BUNDLED[spec]})"
        return parse_azure_csv(text, name=spec, source=source, max_listed=max_listed)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        known = ", ".join(sorted(BUNDLED))
        raise TraceError(f"{path}: no such file (bundled traces: {known})") from None
    except OSError as e:
        raise TraceError(f"{path}: cannot read ({e.strerror or e})") from e
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise TraceError(f"{path}: bad gzip data ({e})") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TraceError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    name = path.name.removesuffix(".gz").rsplit(".", 1)[0] or path.name
    return parse_trace(text, name=name, source=str(path), max_listed=max_listed)
