"""runkit/logs.py: the one log reader/writer: row types, strict reading of our logs, appending, parts and merging."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runkit import logs, parts, sidecars
from runkit.errors import UserError
from runkit.logs import HEADER, PREDICT_HEADER, PredictRow, Row, open_for_append, read_log, read_rows
from runkit.parts import merge_parts

REPO = Path(__file__).resolve().parents[1]
ROWS = [Row(0, 3, 3, 0.4123456789012345, 1, 1.25), Row(1, 2, -1, 0.0, 0, 0.5), Row(2, 7, 1, 0.1, 0, 2.0)]


def test_row_lines_and_headers():
    assert HEADER == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    assert PREDICT_HEADER == "idx\tlabel\tpredict\tcorrect\ttime"
    assert ROWS[0].line() == "0\t3\t3\t0.4123456789012345\t1\t1.2500\n"  # radius at full precision
    assert PredictRow(5, 1, -1, 0, 0.123456).line() == "5\t1\t-1\t0\t0.1235\n"


def test_strict_and_tolerant_readers_agree(tmp_path):
    path = tmp_path / "log.tsv"
    path.write_text(logs.format_log(ROWS))
    rows, length = read_rows(path)
    assert list(rows.values()) == [Row(r.idx, r.label, r.predict, r.radius, r.correct, round(r.time, 4))
                                   for r in ROWS]
    assert length == len(path.read_bytes())
    df = read_log(path)
    assert df["radius"].tolist() == [r.radius for r in ROWS] and df["correct"].tolist() == [True, False, False]
    assert df.attrs["kind"] == "certify" and df.attrs["correct_column"] == "flags"


def test_predict_rows_round_trip(tmp_path):
    path = tmp_path / "predict.tsv"
    rows = [PredictRow(0, 1, 1, 1, 0.5), PredictRow(4, 2, -1, 0, 0.25)]
    path.write_text(logs.format_log(rows, PredictRow))
    assert list(read_rows(path, PredictRow)[0].values()) == rows
    assert read_log(path).attrs["kind"] == "predict"
    with pytest.raises(UserError, match="expected the header"):  # a PREDICT log is not a CERTIFY log
        read_rows(path, Row)


def test_half_written_last_line_is_dropped_and_appending_resumes_before_it(tmp_path):
    path = tmp_path / "log.tsv"
    text = logs.format_log(ROWS)
    path.write_text(text[:-3])  # the last row without its newline (its time cut short)
    rows, length = read_rows(path)
    assert sorted(rows) == [0, 1] and length == text.index("2\t7")
    with open_for_append(path) as log:
        log.write(ROWS[2].line())
    assert path.read_text() == text


def test_strict_reader_rejects_foreign_headers_and_bad_lines(tmp_path):
    path = tmp_path / "log.tsv"
    path.write_text("idx,label,predict,radius,correct,time\n0,1,1,0.5,1,1.0\n")
    with pytest.raises(UserError, match="log.tsv: not a log of this kind"):
        read_rows(path)
    path.write_text(HEADER + "\n" + ROWS[0].line() + "1\tx\t1\t0.5\t1\t1.0\n" + ROWS[2].line())
    with pytest.raises(UserError, match="log.tsv: line 3 is malformed"):
        read_rows(path)
    path.write_text(HEADER + "\n" + ROWS[0].line() + "1\t2\t1\n")  # a short last line WITH its newline: an error
    with pytest.raises(UserError, match="line 3"):
        read_rows(path)


def test_merge_parts(tmp_path):
    out = tmp_path / "log.tsv"
    parts.part_path(out, 0).write_text(logs.format_log([ROWS[2], ROWS[0]]))
    parts.part_path(out, 1).write_text(logs.format_log([ROWS[1]]) + "3\t1\t1")  # with a half-written line
    assert parts.existing_parts(out) == [parts.part_path(out, 0), parts.part_path(out, 1)]
    merged = merge_parts(out)
    assert [r.idx for r in merged] == [0, 1, 2]
    assert out.read_text() == logs.format_log(merged) and parts.existing_parts(out) == []
    assert sidecars.sidecar_path(out).name == "log.tsv.json"


def test_logs_and_analyze_do_not_import_torch():
    code = "import sys, runkit.logs, analyze; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
