"""Request traces: the Azure 2023 CSVs and the Mooncake JSONL, parsing, errors, bundling."""

from __future__ import annotations

import gzip
import json
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest

from topo_sched.sim.traces import (
    BUNDLED,
    Request,
    TraceError,
    bundled_trace_text,
    detect_trace_format,
    load_trace,
    parse_azure_csv,
    parse_mooncake_jsonl,
    parse_trace,
)

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"


@pytest.fixture(scope="module")
def traces_dir(shared_dir: Path) -> Path:
    return shared_dir / "traces"


def _data_lines(path: Path) -> list[str]:
    """Non-blank lines, read independently of the parser."""
    return [ln for ln in path.read_text(encoding="utf-8").split("\n") if ln.strip()]


def _azure_seconds(ts: str) -> Decimal:
    date, frac = ts.split(".")
    whole = datetime.strptime(date, "%Y-%m-%d %H:%M:%S").timestamp()
    return Decimal(int(whole)) + Decimal("0." + frac)


# -- the real files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fname", "expected"),
    [("AzureLLMInferenceTrace_code.csv", 8819), ("AzureLLMInferenceTrace_conv.csv", 19366)],
)
def test_azure_files_parse_completely(traces_dir: Path, fname: str, expected: int) -> None:
    path = traces_dir / "azure-llm-2023" / fname
    raw = path.read_bytes()
    assert not raw.endswith(b"\n")  # the last line has no newline
    lines = _data_lines(path)
    assert lines[0] == HEADER
    assert len(lines) - 1 == expected  # one header, no blank lines, one request a line

    trace = load_trace(path)
    assert trace.format == "azure-csv"
    assert trace.skipped == [] and trace.skipped_count == 0
    assert len(trace) == expected
    assert [r.id for r in trace.requests] == list(range(expected))
    arrivals = [r.arrival_s for r in trace.requests]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0

    rows = [ln.split(",") for ln in lines[1:]]
    # The file is in time order, so the parsed order is the file order.
    assert [(r.prompt_tokens, r.output_tokens) for r in trace.requests] == [
        (max(1, int(c)), max(1, int(g))) for _, c, g in rows
    ]
    span = _azure_seconds(rows[-1][0]) - _azure_seconds(rows[0][0])
    assert trace.duration_s == pytest.approx(float(span), abs=1e-6)
    assert 3400 < trace.duration_s < 3600  # about one hour


def test_mooncake_file_parses_completely(traces_dir: Path) -> None:
    path = traces_dir / "mooncake-fast25" / "conversation_trace.jsonl"
    lines = _data_lines(path)
    assert len(lines) == 12031
    objs = [json.loads(ln) for ln in lines]

    trace = load_trace(path)
    assert trace.format == "mooncake-jsonl"
    assert len(trace) == 12031 and trace.skipped_count == 0
    assert trace.requests[0].arrival_s == objs[0]["timestamp"] / 1000 == 0.0
    assert trace.duration_s == pytest.approx(max(o["timestamp"] for o in objs) / 1000)
    assert sum(r.prompt_tokens for r in trace.requests) == sum(o["input_length"] for o in objs)
    assert sum(r.output_tokens for r in trace.requests) == sum(
        max(1, o["output_length"]) for o in objs
    )


# -- bundled copies ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_traces_are_the_shared_files(traces_dir: Path, name: str) -> None:
    shared = traces_dir / "azure-llm-2023" / BUNDLED[name]
    assert bundled_trace_text(name).encode("utf-8") == shared.read_bytes()
    by_name = load_trace(name)
    assert by_name.name == name
    assert by_name.source.startswith(f"bundled:{name}")
    assert by_name.requests == load_trace(shared).requests


def test_bundled_readme_carries_the_attribution() -> None:
    import topo_sched

    readme = (Path(topo_sched.__file__).parent / "data" / "traces" / "README.md").read_text()
    for needle in (
        "Azure/AzurePublicDataset",
        "CC BY 4.0",
        "creativecommons.org/licenses/by/4.0",
        "Splitwise",
        "ISCA 2024",
        "b469a113cedca53ddc3bdea71a143dc4b7d8700c",
        "unmodified",
    ):
        assert needle in readme
    assert "mooncake" not in " ".join(BUNDLED).lower()


def test_unknown_bundled_name_and_missing_file() -> None:
    with pytest.raises(TraceError, match="no bundled trace"):
        bundled_trace_text("azure-nope")
    with pytest.raises(TraceError, match=r"azure-nope.*no such file"):
        load_trace("azure-nope")


# -- Azure parsing details ------------------------------------------------------------------


def test_seven_fraction_digits_keep_their_order() -> None:
    # Differ only in the 7th digit (100 ns), which datetime would drop; out of file order.
    text = "\n".join(
        [
            HEADER,
            "2023-11-16 18:17:03.0000002,20,2",
            "2023-11-16 18:17:03.0000001,10,1",
            "2023-11-16 18:17:04.9999999,30,3",
        ]
    )  # no trailing newline
    trace = parse_azure_csv(text)
    assert [r.prompt_tokens for r in trace.requests] == [10, 20, 30]
    a = [r.arrival_s for r in trace.requests]
    assert a[0] == 0.0 and a[1] == pytest.approx(1e-7) and a[1] > 0
    assert a[2] == pytest.approx(1.9999998)


def test_equal_timestamps_keep_file_order() -> None:
    text = f"{HEADER}\n2023-11-16 18:00:00.5,7,1\n2023-11-16 18:00:00.5,3,1\n"
    assert [r.prompt_tokens for r in parse_azure_csv(text).requests] == [7, 3]


def test_bad_azure_lines_are_skipped_and_reported() -> None:
    text = "\n".join(
        [
            HEADER,
            "2023-11-16 18:17:03.9799600,4808,10",
            "2023-11-16 18:17:04.0319600,3180,x",
            "2023-11-16 18:17:05.0,-3,8",
            "2023-11-16 18:17:06.0,12",
            "",
            "yesterday,5,5",
            "2023-13-16 18:17:07.0,5,5",
            "2023-11-16 18:17:08.0,100,0",
        ]
    )
    trace = parse_azure_csv(text, source="t.csv")
    assert [(r.prompt_tokens, r.output_tokens) for r in trace.requests] == [(4808, 10), (100, 1)]
    assert trace.skipped_count == 5
    assert trace.skipped[0] == "line 3: GeneratedTokens 'x' is not an integer"
    assert trace.skipped[1] == "line 4: ContextTokens -3 is negative"
    assert trace.skipped[2] == "line 5: expected 3 fields, got 2"
    assert trace.skipped[3].startswith("line 7: TIMESTAMP 'yesterday' is not a timestamp")
    assert trace.skipped[4].startswith("line 8: TIMESTAMP '2023-13-16 18:17:07.0' is not a valid")
    assert "5 line(s) skipped" in trace.skipped_summary()


def test_skipped_list_is_capped_but_counted() -> None:
    bad = [f"2023-11-16 18:17:0{i % 10}.0,1,oops" for i in range(30)]
    text = "\n".join([HEADER, "2023-11-16 18:17:00.0,1,1", *bad])
    trace = parse_azure_csv(text, max_listed=5)
    assert len(trace) == 1
    assert len(trace.skipped) == 5 and trace.skipped_count == 30
    assert trace.skipped_summary().endswith("and 25 more")


def test_columns_found_by_name() -> None:
    text = "GeneratedTokens,NumImages,TIMESTAMP,ContextTokens\n4,0,2023-11-16 18:00:00.0,9\n"
    (r,) = parse_azure_csv(text).requests
    assert (r.prompt_tokens, r.output_tokens) == (9, 4)


def test_no_usable_line_raises_naming_the_source() -> None:
    with pytest.raises(TraceError, match=r"bad\.csv: no usable request line \(2 skipped"):
        parse_azure_csv(f"{HEADER}\nx,1,1\ny,2,2\n", source="bad.csv")
    with pytest.raises(TraceError, match=r"h\.csv: no request lines"):
        parse_azure_csv(HEADER + "\n\n", source="h.csv")
    with pytest.raises(TraceError, match="lacks the Azure LLM trace columns"):
        parse_azure_csv("a,b,c\n1,2,3\n", source="x.csv")


# -- Mooncake parsing details ---------------------------------------------------------------


def test_mooncake_bad_lines_are_skipped_and_reported() -> None:
    lines = [
        '{"timestamp": 1500, "input_length": 10, "output_length": 2, "hash_ids": [0]}',
        '{"timestamp": 500, "input_length": 20, "output_length": 0}',
        "{not json",
        '{"timestamp": 7, "output_length": 2}',
        "[1, 2, 3]",
        '{"timestamp": "soon", "input_length": 1, "output_length": 1}',
        '{"timestamp": 9, "input_length": 1.5, "output_length": 1}',
    ]
    trace = parse_mooncake_jsonl("\n".join(lines), source="m.jsonl")
    assert trace.requests == [Request(0, 0.5, 20, 1), Request(1, 1.5, 10, 2)]
    assert trace.skipped_count == 5
    assert trace.skipped[0].startswith("line 3: not JSON")
    assert trace.skipped[1] == "line 4: no 'input_length'"
    assert trace.skipped[2] == "line 5: not a JSON object"
    assert trace.skipped[3] == "line 6: timestamp 'soon' is not a number"
    assert trace.skipped[4] == "line 7: input_length 1.5 is not an integer"


# -- detection and files --------------------------------------------------------------------


def test_detect_format() -> None:
    assert detect_trace_format("\ufeff" + HEADER + "\n") == "azure-csv"
    assert detect_trace_format("\n\n" + HEADER) == "azure-csv"
    assert detect_trace_format('{"timestamp": 0}\n') == "mooncake-jsonl"
    with pytest.raises(TraceError, match=r"f\.txt: unknown trace format: line 1"):
        detect_trace_format("Timestamp,Request tokens,Response tokens\n", "f.txt")
    with pytest.raises(TraceError, match="empty"):
        detect_trace_format("\n\n", "e.txt")


def test_unknown_format_file_raises_naming_it(tmp_path: Path) -> None:
    p = tmp_path / "burst.csv"
    p.write_text("Timestamp,Model,Request tokens\n1,gpt,3\n")
    with pytest.raises(TraceError, match=f"{p}: unknown trace format"):
        load_trace(p)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(TraceError, match=f"{empty}: empty"):
        load_trace(empty)
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TraceError, match="not UTF-8"):
        load_trace(binary)


def test_gzip_file_loads(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"timestamp": 0, "input_length": 3, "output_length": 4}\n'))
    trace = load_trace(p)
    assert trace.name == "t" and trace.requests == [Request(0, 0.0, 3, 4)]


def test_parse_trace_dispatches() -> None:
    assert parse_trace(f"{HEADER}\n2023-11-16 18:00:00.0,1,1").format == "azure-csv"


# -- compress and window --------------------------------------------------------------------


def test_compress_and_window() -> None:
    trace = load_trace("azure-conv")
    fast = trace.compress(10)
    assert len(fast) == len(trace)
    assert all(
        f.arrival_s == pytest.approx(r.arrival_s / 10) and f.id == r.id
        for f, r in zip(fast.requests, trace.requests, strict=True)
    )
    assert fast.duration_s == pytest.approx(trace.duration_s / 10)

    win = trace.window(600, 300)
    expected = [r for r in trace.requests if 600 <= r.arrival_s < 900]
    assert [r.id for r in win.requests] == [r.id for r in expected]
    assert all(0 <= r.arrival_s < 300 for r in win.requests)
    assert win.requests[0].arrival_s == pytest.approx(expected[0].arrival_s - 600)
    assert [r.arrival_s for r in win.requests] == sorted(r.arrival_s for r in win.requests)
    assert len(trace.window(0)) == len(trace)
    assert len(trace.window(1e9, 10)) == 0
    with pytest.raises(ValueError):
        trace.compress(0)
    with pytest.raises(ValueError):
        trace.window(0, -1)
