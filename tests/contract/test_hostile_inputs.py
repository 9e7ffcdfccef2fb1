"""Issue 9: inputs that cannot crash a job, lose a record or corrupt data.

One regression test per case of the issue (bad files before the run, one-line CLI errors,
records split or merged by readers, values the typed pipeline cannot carry), plus the
readers' line numbers and the quiet command line.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from skewless.beam_pipelines.io.files import InputError, check_input, read_file_records
from skewless.beam_pipelines.jobs import prepare
from skewless.beam_pipelines.runtime.launch import run_job
from skewless.examples.flights import FLIGHTS
from skewless.transforms.examples import BuildExamples
from skewless.transforms.record_checks import (
    CheckRecords,
    InvalidRecord,
    RawBatch,
    RawLine,
    RecordChecker,
    UnparseableRow,
    to_epoch_ms,
)
from tests.support.flights_data import CSV_COLUMNS, real_flights, write_csv, write_jsonl

ROWS = real_flights(1, 1)[:120]
HEADER = ",".join(CSV_COLUMNS)


def csv_line(row: dict, **changes) -> str:
    row = {**row, **changes}
    return ",".join("" if row[c] is None else str(row[c]) for c in CSV_COLUMNS)


def records_of(path: Path, fmt: str, fs=FLIGHTS) -> list:
    """Every element the file reader emits, RecordBatches flattened to (row, position)."""
    out = []
    for element in read_file_records(str(path), fmt, fs):
        if isinstance(element, RawBatch):
            out.extend(zip(element.batch.to_pylist(), list(element.positions), strict=True))
        else:
            out.append(element)
    return out


# --- 1. values the typed pipeline cannot carry never pass validation --------------------------


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"flight": 99999999999999999999}, "outside the 64-bit integer range"),
        ({"flight": "99999999999999999999"}, "outside the 64-bit integer range"),
        ({"flight": 2**63}, "outside the 64-bit integer range"),
        ({"flight": 1e20}, "outside the 64-bit integer range"),
        ({"dep_delay": float("nan")}, "not a finite number"),
        ({"dep_delay": "NaN"}, "not a finite number"),
        ({"air_time": "inf"}, "not a finite number"),
        ({"air_time": 1e300}, "beyond the float32 range"),
        ({"air_time": 10**400}, "beyond the float range"),
        ({"time_hour": 1e13}, "outside the accepted time range"),  # the year 318,857
        ({"time_hour": "318857-01-01"}, "is not an ISO-8601 timestamp or epoch seconds"),
        ({"time_hour": "1899-12-31T23:00:00Z"}, "outside the accepted time range"),
        ({"time_hour": float("nan")}, "not a timestamp"),
        ({"tailnum": "N\ud800X"}, "not valid Unicode"),
        ({"carrier": "X" * 2000}, "longer than 1024 bytes"),
        ({"flight": "1_000"}, "is not an integer"),
    ],
)
def test_values_the_pipeline_cannot_carry_are_rejected(changes, reason):
    raw = {**ROWS[0], **changes}
    with pytest.raises(InvalidRecord, match=reason):
        RecordChecker(FLIGHTS).validate(raw)


def test_timestamps_as_epoch_seconds_are_the_same_in_text_and_numbers():
    validator = RecordChecker(FLIGHTS)
    iso = validator.validate(dict(ROWS[0]))
    for value in (1357034400, 1357034400.0, "1357034400", "1357034400.0", " 1357034400 "):
        raw = {**ROWS[0], "time_hour": value}
        assert (
            validator.validate(raw)["time_hour"]
            == iso["time_hour"]
            == to_epoch_ms("2013-01-01T10:00:00Z")
        )


def test_a_declared_timestamp_range_and_non_finite_fields_are_honoured():
    from dataclasses import replace

    fs = replace(
        FLIGHTS,
        timestamp_range=("2013-01-01T00:00:00+00:00", "2014-01-01T00:00:00+00:00"),
        allow_non_finite=("air_time",),
    )
    validator = RecordChecker(fs)
    assert math.isnan(validator.validate({**ROWS[0], "air_time": float("nan")})["air_time"])
    with pytest.raises(
        InvalidRecord,
        match=r"accepted time range \[2013-01-01T00:00:00\+00:00, 2014-01-01T00:00:00\+00:00\)",
    ):
        validator.validate({**ROWS[0], "time_hour": "2012-12-31T23:00:00Z"})


def test_derived_event_time_outside_the_range_is_rejected():
    # time_hour at the very end of the range; dep_delay moves the departure past it
    raw = {**ROWS[0], "time_hour": "2200-12-31T23:00:00Z", "minute": 59, "dep_delay": 120.0}
    with pytest.raises(InvalidRecord, match="derived 'scheduled_departure'|derived 'event_time'"):
        RecordChecker(FLIGHTS).validate(raw)


def test_nan_is_never_a_missing_value():
    # A cancelled flight has no dep_delay (null); NaN is a broken number, not a cancellation.
    validator = RecordChecker(FLIGHTS)
    assert validator.validate({**ROWS[0], "dep_delay": None, "dep_time": None}) is None
    with pytest.raises(InvalidRecord, match="'dep_delay' nan is not a finite number"):
        validator.validate({**ROWS[0], "dep_delay": float("nan")})


# --- the batch example path on records that passed validation ------------------------------------


@pytest.fixture(scope="module")
def hostile_inputs(tmp_path_factory) -> Path:
    """A CSV and a JSON-lines file of real flights, each with the issue's bad records."""
    root = tmp_path_factory.mktemp("hostile")
    good = ROWS[:60]
    csv_bad = [
        csv_line(ROWS[60], flight=99999999999999999999),
        csv_line(ROWS[61], dep_delay="NaN"),
        csv_line(ROWS[62], time_hour="10000000000000"),
    ]
    csv_good_epoch = [csv_line(ROWS[63], time_hour=str(to_epoch_ms(ROWS[63]["time_hour"]) // 1000))]
    write_csv(root / "flights.csv", good, [*csv_bad, *csv_good_epoch])
    json_rows = ROWS[64:120]
    lines = [json.dumps(r, ensure_ascii=False) for r in json_rows]
    lines.append(json.dumps({**ROWS[0], "flight": 100000000000000000000}))
    lines.append(json.dumps({**ROWS[1], "dep_delay": float("nan")}))  # NaN is accepted by json
    lines.append(json.dumps({**ROWS[2], "tailnum": "N1\u2028X\u0085Y"}, ensure_ascii=False))
    (root / "flights.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_reader_counts_every_record_once_with_its_line(hostile_inputs):
    csv_records = records_of(hostile_inputs / "flights.csv", "csv")
    assert len(csv_records) == 64
    assert [pos for _, pos in csv_records] == list(range(2, 66))  # header is line 1
    json_records = records_of(hostile_inputs / "flights.jsonl", "jsonl")
    assert len(json_records) == 59
    assert all(isinstance(r, RawLine) for r in json_records)
    assert [r.line for r in json_records] == list(range(1, 60))
    assert "N1\u2028X\u0085Y" in json_records[-1].text


@pytest.mark.timeout(300)
def test_examples_path_survives_every_valid_record_and_dead_letters_the_rest(hostile_inputs):
    """prepare's and score's path (read, validate, BuildExamples): no OverflowError, no lost
    record; every dead letter names its file and line."""
    from skewless.beam_pipelines.io.file_sources import ReadRawFiles

    with TestPipeline(runner="FnApiRunner") as p:
        raw = p | ReadRawFiles(str(hostile_inputs / "flights.*"), fs=FLIGHTS)
        events, dead = raw | CheckRecords(FLIGHTS)
        examples = events | BuildExamples(FLIGHTS, require_label=False)
        rows = examples | beam.Map(lambda b: b.num_rows) | beam.CombineGlobally(sum)
        cancelled = sum(1 for r in [*ROWS[:60], *ROWS[63:120]] if r["dep_delay"] is None)
        assert_that(rows, equal_to([60 + 1 + 56 + 1 - cancelled]), label="examples")
        letters = dead | beam.Map(
            lambda d: (Path(d["file"]).name, d["line"], d["reason"].split(" ", 2)[1])
        )
        assert_that(
            letters,
            equal_to(
                [
                    ("flights.csv", 62, "'flight'"),
                    ("flights.csv", 63, "'dep_delay'"),
                    ("flights.csv", 64, "'time_hour'"),
                    ("flights.jsonl", 57, "'flight'"),
                    ("flights.jsonl", 58, "'dep_delay'"),
                ]
            ),
            label="dead letters",
        )


@pytest.mark.timeout(300)
def test_prepare_on_the_hostile_inputs_counts_every_record(hostile_inputs, tmp_path):
    summary = prepare.run(
        ["--input", str(hostile_inputs / "flights.*"), "--output_dir", str(tmp_path / "out"),
         "--allow_duplicate_example_keys"]
    )  # fmt: skip
    assert summary["duplicate_example_keys"] == 2  # the JSON-lines copy of a CSV row
    assert summary["records_read"] == 64 + 59
    assert summary["records_rejected"] == 5
    assert summary["records_read"] == (
        summary["records_valid"] + summary["records_rejected"] + summary["records_not_events"]
    )
    features = pq.read_table(tmp_path / "out" / "features").to_pylist()
    assert {r["flight"] for r in features} <= {r["flight"] for r in ROWS}


# --- 2. a header naming a column twice is a file-level error, not silent corruption ------------


@pytest.mark.parametrize(
    "renamed, message",
    [
        ("arr_time", r"duplicate column\(s\) \['dep_delay'\]"),
        (
            "time_hour",
            r"duplicate column\(s\) \['dep_delay'\]; missing required column\(s\) \['time_hour'\]",
        ),
    ],
)
def test_duplicate_column_is_an_error_before_the_run(tmp_path, renamed, message):
    columns = ["dep_delay" if c == renamed else c for c in CSV_COLUMNS]
    path = tmp_path / "dup.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in ROWS[:30]:
            writer.writerow(["" if row[c] is None else row[c] for c in CSV_COLUMNS])
    with pytest.raises(InputError, match=message):
        check_input(str(path), None, FLIGHTS)
    with pytest.raises(InputError, match=message):
        prepare.run(["--input", str(path), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="duplicate"):  # the reader refuses it too
        records_of(path, "csv")


def test_header_errors_follow_the_feature_set_policy(tmp_path):
    from tests.support.toy_featureset import CLICKS

    path = tmp_path / "clicks.csv"
    path.write_text("ts,user,site,price,campaign\n2024-01-01T00:00:00Z,u,s,1,x\n")
    check_input(str(path), None, CLICKS)  # CLICKS ignores unexpected fields; bought is nullable
    path.write_text("ts,user,price\n2024-01-01T00:00:00Z,u,1\n")
    with pytest.raises(InputError, match=r"missing required column\(s\) \['site'\]"):
        check_input(str(path), None, CLICKS)
    flights = tmp_path / "f.csv"
    write_csv(flights, ROWS[:3])
    flights.write_text(flights.read_text().replace("tailnum", "tail_number", 1))
    with pytest.raises(InputError, match=r"unexpected column\(s\) \['tail_number'\]"):
        check_input(str(flights), None, FLIGHTS)


def test_parquet_schema_is_checked_and_dead_letters_carry_the_row_index(tmp_path):
    rows = [dict(r) for r in ROWS[:10]]
    rows[3]["month"] = 13
    path = tmp_path / "f.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    check_input(str(path), None, FLIGHTS)
    with TestPipeline(runner="FnApiRunner") as p:
        from skewless.beam_pipelines.io.file_sources import ReadRawFiles

        _, dead = p | ReadRawFiles(str(path), fs=FLIGHTS) | CheckRecords(FLIGHTS)
        assert_that(dead | beam.Map(lambda d: (d["row"], d["file"])), equal_to([(3, str(path))]))
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows).drop_columns(["origin"]), bad)
    with pytest.raises(InputError, match=r"missing required column\(s\) \['origin'\]"):
        check_input(str(bad), None, FLIGHTS)


# --- 3. a quoted record across Arrow's 1 MiB block boundary stays one record --------------------


def test_quoted_newlines_across_the_block_boundary_keep_every_record(tmp_path):
    path = tmp_path / "quoted.csv"
    rows = [dict(r) for r in real_flights(1, 1, days=20)][:15_000]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for i, row in enumerate(rows):
            if f.tell() > (1 << 20) - 300 and f.tell() < (1 << 20):
                # A quoted value, newlines every 20 characters, straddling byte 1,048,576.
                row["tailnum"] = "\n".join(f"part{j:015d}" for j in range(40))
            elif row["tailnum"]:
                row["tailnum"] = f"{row['tailnum']}\nsecond line {i}"
            writer.writerow(["" if row[c] is None else row[c] for c in CSV_COLUMNS])
    assert path.stat().st_size > 1.5 * (1 << 20)
    records = records_of(path, "csv")
    assert not [r for r in records if isinstance(r, UnparseableRow)]
    assert len(records) == 15_000
    assert [row["tailnum"] for row, _ in records] == [r["tailnum"] for r in rows]
    # Line numbers follow the newlines inside the quoted values.
    line = 2
    for (_, position), row in zip(records, rows, strict=True):
        assert position == line
        line += 1 + (row["tailnum"] or "").count("\n")


def test_invalid_rows_and_blank_lines_keep_the_line_numbers(tmp_path):
    path = tmp_path / "mixed.csv"
    good = [csv_line(r) for r in ROWS[:4]]
    text = (
        "\n".join([HEADER, good[0], "", good[1], "2013,1,1,517", good[2], "", "", good[3]]) + "\n"
    )
    path.write_text(text)
    records = records_of(path, "csv")
    rows = [
        (row["flight"], pos)
        for row, pos in (r for r in records if not isinstance(r, UnparseableRow))
    ]
    assert rows == [
        (ROWS[0]["flight"], 2),
        (ROWS[1]["flight"], 4),
        (ROWS[2]["flight"], 6),
        (ROWS[3]["flight"], 9),
    ]
    (bad,) = [r for r in records if isinstance(r, UnparseableRow)]
    assert (bad.text, bad.line, bad.file, bad.reason) == (
        "2013,1,1,517",
        5,
        str(path),
        "expected 19 fields, got 4",
    )


# --- 4. JSON lines split on \n only ---------------------------------------------------------------


@pytest.mark.parametrize(
    "separator", ["\u2028", "\u2029", "\u0085", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c", "\r"]
)
def test_a_line_separator_inside_a_json_string_is_one_record(tmp_path, separator):
    rows = [dict(r) for r in ROWS[:5]]
    rows[2]["tailnum"] = f"N1{separator}X"
    path = write_jsonl(tmp_path / "f.jsonl", [])
    path.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8"
    )
    records = records_of(path, "jsonl")
    assert [r.line for r in records] == [1, 2, 3, 4, 5]
    typed = RecordChecker(FLIGHTS).typed(json.loads(records[2].text))
    assert typed["tailnum"] == f"N1{separator}X"


def test_json_lines_that_are_not_utf8_are_dead_letters_not_lost(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'{"a": 1}\r\n\xff\xfe\n\n{"b": 2}')
    records = records_of(path, "jsonl")
    assert [type(r).__name__ for r in records] == ["RawLine", "UnparseableRow", "RawLine"]
    assert [r.line for r in records] == [1, 2, 4]


# --- 5. bad files: one line before the pipeline starts ------------------------------------------


def _bad_inputs(root: Path) -> dict:
    good = root / "good.csv"
    write_csv(good, ROWS[:5])
    (root / "empty.csv").write_bytes(b"")
    (root / "binary.csv").write_bytes(bytes(range(256)) * 8)
    (root / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    (root / "plain.csv.gz").write_bytes(good.read_bytes())
    (root / "truncated.csv.gz").write_bytes(gzip.compress(good.read_bytes())[:-20])
    with zipfile.ZipFile(root / "two.zip", "w") as z:
        z.writestr("a.csv", good.read_text())
        z.writestr("b.csv", good.read_text())
    (root / "adir").mkdir()
    (root / "gzipped.csv").write_bytes(gzip.compress(good.read_bytes()))
    (root / "data.xlsx").write_bytes(b"x")
    (root / "a_file").write_text("x")
    return {
        "empty.csv": ([], "the file is empty (0 bytes)"),
        "binary.csv": ([], "binary content (NUL bytes), not CSV text"),
        "corrupt.parquet": ([], "not a readable Parquet file"),
        "plain.csv.gz": ([], "not a valid gzip file"),
        "truncated.csv.gz": ([], "not a valid gzip file"),
        "two.zip": ([], "expected one file in the zip archive, found 2"),
        "adir": (["--input_format", "csv"], "is a directory"),
        "gzipped.csv": ([], "gzip-compressed (name it .gz)"),
        "nothing/*.csv": ([], "matches no file"),
        "data.xlsx": ([], "cannot tell the format"),
        "good.csv": (["--output_dir", str(root / "a_file")], "--output_dir"),
    }


def test_every_bad_file_is_one_line_and_a_non_zero_exit(tmp_path, capsys):
    for name, (extra, message) in _bad_inputs(tmp_path).items():
        out = str(tmp_path / "out")
        args = ["--input", str(tmp_path / name), "--output_dir", out, *extra]
        code = run_job("prepare", args)
        err = capsys.readouterr().err.strip()
        assert code == 2, (name, err)
        assert err.startswith("skewless prepare: ") and message in err, (name, err)
        assert "\n" not in err and "Traceback" not in err, (name, err)
        assert not (tmp_path / "out").exists(), name


def test_verbose_brings_the_traceback_back(tmp_path, capsys):
    (tmp_path / "empty.csv").write_bytes(b"")
    args = ["--input", str(tmp_path / "empty.csv"), "--output_dir", str(tmp_path / "o")]
    assert run_job("prepare", args, verbose=True) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("skewless prepare: ")


def test_bad_option_values_are_one_line(capsys):
    assert run_job("prepare", ["--output_dir", "x", "--input_format", "xls"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("skewless prepare: argument --input_format: invalid choice: 'xls'")
    assert "\n" not in err
    assert run_job("prepare", ["--output_dir", "x", "--eval_fraction", "7"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "skewless prepare: --eval_fraction must be in [0, 1], got 7.0"
    )


def test_a_failure_inside_the_pipeline_is_one_line_too(capsys, monkeypatch):
    def explode(argv):
        raise RuntimeError(
            "Pipeline failed: Traceback (most recent call last):\n  File 'x', line 1\n"
            "ValueError: a worker broke [while running 'Read/ReadFile']"
        )

    monkeypatch.setattr(prepare, "run", explode)
    assert run_job("prepare", []) == 1
    assert capsys.readouterr().err.strip() == "skewless prepare: ValueError: a worker broke"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_command_prints_its_own_lines_only(tmp_path):
    """No TensorFlow/absl start-up screen: an error is exactly one line; a run only its result."""
    (tmp_path / "empty.csv").write_bytes(b"")
    skewless = [sys.executable, "-m", "skewless.beam_pipelines.runtime.cli"]
    proc = subprocess.run(
        [*skewless, "prepare", "--input", str(tmp_path / "empty.csv"), "--output_dir", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"skewless prepare: {tmp_path / 'empty.csv'}: the file is empty (0 bytes)"
    ]
    assert proc.stdout == ""
    good = write_csv(tmp_path / "good.csv", ROWS[:40])
    proc = subprocess.run(
        [*skewless, "prepare", "--input", str(good), "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    noise = (
        "oneDNN",
        "cuda",
        "cpu_feature_guard",
        "absl::InitializeLog",
        "I0000",
        "E0000",
        "W0000",
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    assert not [line for line in lines if any(n in line for n in noise)], lines
    assert [line for line in lines if "skewless.prepare" in line and "prepare finished" in line]
    # The Flex Template entry point (python -m) reports errors the same way.
    proc = subprocess.run(
        [sys.executable, "-m", "skewless.beam_pipelines.jobs.prepare", "--input", str(tmp_path / "empty.csv"), "--output_dir", "o"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert (
        proc.stderr.splitlines()[-1]
        == f"skewless prepare: {tmp_path / 'empty.csv'}: the file is empty (0 bytes)"
    )


# --- streaming: message parsing never fails a bundle ----------------------------------------------


@pytest.mark.parametrize(
    "value, reason",
    [
        ("99999999999999999999", "outside the accepted time range"),
        ("-99999999999999999999", "outside the accepted time range"),
        ("10000000000000000", "outside the accepted time range"),
        ("١٢٣٤", "neither epoch milliseconds nor RFC 3339"),
        ("1e12", "neither epoch milliseconds nor RFC 3339"),
        ("NaN", "neither epoch milliseconds nor RFC 3339"),
        ("9999-12-31T00:00:00Z", "outside the accepted time range"),
        (None, "missing"),
    ],
)
def test_garbled_timestamp_attributes_are_bad_timestamps(value, reason):
    from skewless.beam_pipelines.io.pubsub import BadTimestamp, parse_timestamp_attribute

    with pytest.raises(BadTimestamp, match=reason):
        parse_timestamp_attribute(value)


def test_parse_messages_turns_every_poison_message_into_one_dead_letter():
    from apache_beam.io.gcp.pubsub import PubsubMessage
    from apache_beam.transforms.window import TimestampedValue

    from skewless.beam_pipelines.io.pubsub import HEARTBEAT_ATTRIBUTE, _ParseMessages

    fn = _ParseMessages("event_time", FLIGHTS)
    fn.setup()
    good = PubsubMessage(b'{"a": 1}', {"event_time": "1357034400000"})
    poison = [
        PubsubMessage(b"x", {"event_time": "99999999999999999999"}),
        PubsubMessage(b"x", {"event_time": "2013-01-01T00:00:00"}),
        PubsubMessage(b"\xff\xfe", {}),
        PubsubMessage(None, {"event_time": 12}),  # not text
        "not a message at all",
    ]
    outputs = [
        list(fn.process(m)) for m in [good, *poison, PubsubMessage(b"", {HEARTBEAT_ATTRIBUTE: "1"})]
    ]
    assert (
        isinstance(outputs[0][0], TimestampedValue)
        and outputs[0][0].timestamp.micros == 1357034400000000
    )
    for out in outputs[1:-1]:
        assert len(out) == 1 and out[0].tag == "dead", out
        letter = out[0].value
        assert letter["stage"] in ("timestamp", "parse") and letter["reason"]
        json.dumps(letter)
    assert outputs[-1] == []


# --- BigQuery: the table's columns against the feature set, before the run ------------------------


@pytest.mark.emulator
@pytest.mark.timeout(300)
def test_bigquery_table_columns_are_checked_before_the_run(bq_emulator, tmp_path):
    from tests.support.flights_data import flights_arrow_table as flights_table

    dataset = bq_emulator.create_dataset()
    table = flights_table([dict(r) for r in ROWS[:5]])
    extra = bq_emulator.create_table(
        dataset, "extra", table.append_column("seat", pa.array(["1A"] * 5))
    )
    missing = bq_emulator.create_table(dataset, "missing", table.drop_columns(["origin"]))
    cases = {
        extra: r"unexpected column\(s\) \['seat'\]",
        missing: r"missing required column\(s\) \['origin'\]",
        f"{bq_emulator.project}.{dataset}.nowhere": "not found",
    }
    for name, message in cases.items():
        out = tmp_path / "out"
        with pytest.raises(InputError, match=message):
            prepare.run(
                ["--bigquery_table", name, "--output_dir", str(out), *bq_emulator.args()]
            )
        assert not out.exists()


# --- score: the same inputs, the same promises -----------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_score_on_the_hostile_inputs_and_bad_files(hostile_inputs, trained, tmp_path, capsys):
    from skewless.beam_pipelines.jobs import score

    out = tmp_path / "scored"
    summary = score.run(
        [
            "--model_dir",
            str(trained["model_dir"]),
            "--input",
            str(hostile_inputs / "flights.*"),
            "--output",
            str(out),
        ]
    )
    assert summary["records_read"] == 64 + 59 and summary["records_rejected"] == 5
    assert (
        summary["inference_failures"] == 0
        and summary["examples_scored"] == summary["records_valid"]
    )
    letters = [
        json.loads(line) for f in (out / "dead_letters").glob("*.jsonl") for line in f.open()
    ]
    assert sorted((Path(d["file"]).name, d["line"]) for d in letters) == [
        ("flights.csv", 62), ("flights.csv", 63), ("flights.csv", 64), ("flights.jsonl", 57), ("flights.jsonl", 58)
    ]  # fmt: skip
    (tmp_path / "empty.csv").write_bytes(b"")
    args = [
        "--model_dir",
        str(trained["model_dir"]),
        "--input",
        str(tmp_path / "empty.csv"),
        "--output",
        str(tmp_path / "o"),
    ]
    assert run_job("score", args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"skewless score: {tmp_path / 'empty.csv'}: the file is empty (0 bytes)"


def test_large_compressed_files_have_their_head_checked(tmp_path, monkeypatch):
    """Above FULL_CHECK_BYTES only the head is read before the run; a truncated tail then
    fails the reader with the same clear InputError instead of silently losing records."""
    from skewless.beam_pipelines.io import files
    from skewless.examples.flights import bundled_flights_path

    monkeypatch.setattr(files, "FULL_CHECK_BYTES", 0)
    _bad_inputs(tmp_path)
    check_input(bundled_flights_path(), None, FLIGHTS)
    for name, message in [
        ("two.zip", "expected one file"),
        ("plain.csv.gz", "not a valid gzip file"),
    ]:
        with pytest.raises(InputError, match=message):
            check_input(str(tmp_path / name), None, FLIGHTS)
    big = tmp_path / "big.csv.gz"
    big.write_bytes(
        gzip.compress(write_csv(tmp_path / "big.csv", real_flights(1, 1, days=3)).read_bytes())[
            :-5000
        ]
    )
    check_input(str(big), None, FLIGHTS)  # the head is fine
    with pytest.raises(InputError, match="not a valid gzip file"):
        records_of(big, "csv")


@pytest.mark.timeout(300)
def test_streaming_parse_and_validate_dead_letter_each_poison_message_once():
    """The aggregate job's first two steps (ParseMessages, CheckRecords) on every kind of
    poison message: one dead letter each, the good message through, no failed bundle."""
    from apache_beam.io.gcp.pubsub import PubsubMessage

    from skewless.beam_pipelines.io.pubsub import ParseMessages

    good = dict(ROWS[0])
    ts = {"event_time": str(RecordChecker(FLIGHTS).validate(dict(good))["event_time"])}

    def msg(i: int, attributes=ts, **changes) -> PubsubMessage:
        return PubsubMessage(
            json.dumps({**good, "flight": 900_000 + i, **changes}).encode(), attributes
        )

    poison = [
        PubsubMessage(b"{not json", ts),
        PubsubMessage(b'{"carrier": "\xff"}', ts),
        PubsubMessage(b"[" * 50_000 + b"]" * 50_000, ts),
        msg(1, flight=10**20),
        msg(2, dep_delay=float("nan")),
        msg(3, time_hour=1e13),
        msg(4, tailnum="N\ud800X"),
        msg(5, carrier="C" * 2000),
        msg(6, attributes={}),
        msg(7, attributes={"event_time": "99999999999999999999"}),
    ]
    with TestPipeline(runner="FnApiRunner") as p:
        payloads, bad_times = (
            p | beam.Create([msg(0), *poison]) | ParseMessages("event_time", FLIGHTS)
        )
        events, invalid = payloads | CheckRecords(FLIGHTS)
        assert_that(events | beam.Map(lambda e: e["flight"]), equal_to([900_000]), label="events")
        letters = (bad_times, invalid) | beam.Flatten()
        assert_that(
            letters | beam.combiners.Count.Globally(), equal_to([len(poison)]), label="count"
        )
        assert_that(
            letters
            | beam.Map(lambda d: bool(d["stage"] and d["reason"] and d["record"] is not None)),
            equal_to([True] * len(poison)),
            label="complete",
        )


@pytest.mark.timeout(300)
def test_a_file_that_breaks_during_the_run_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    """A file that passed the check but fails when read (changed since, or corrupt past the
    checked head) fails the job with the reader's one-line reason, not a worker traceback."""
    from skewless.beam_pipelines.io import file_sources

    def broken(path, fmt, fs=None, batch_rows=0):
        raise InputError(f"{path}: not a valid gzip file (truncated)")
        yield

    monkeypatch.setattr(file_sources, "read_file_records", broken)
    good = write_csv(tmp_path / "good.csv", ROWS[:5])
    assert run_job("prepare", ["--input", str(good), "--output_dir", str(tmp_path / "o")]) == 1
    assert (
        capsys.readouterr().err.strip()
        == f"skewless prepare: {good}: not a valid gzip file (truncated)"
    )
