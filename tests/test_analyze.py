"""analyze.py and its library analysis.py: reading every log variant, the metrics on Cohen et al.'s published logs,
tables, plots, errors."""
from __future__ import annotations

import datetime
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import analyze
from analysis import (
    LogWarning,
    abstention_rate,
    acr,
    certified_accuracy,
    clean_accuracy,
    envelope,
    high_prob_certified_accuracy,
    read_log,
)
from runkit.errors import UserError

REPO = Path(__file__).resolve().parents[1]
RADII = np.round(np.arange(0, 1.5 + 1e-9, 0.25), 10)
CIFAR_050 = "certify/cifar10/resnet110/noise_0.50/test/sigma_0.50"  # time as float seconds
CIFAR_SIGMAS = [f"certify/cifar10/resnet110/noise_{s}/test/sigma_{s}" for s in ("0.12", "0.25", "0.50", "1.00")]
IMAGENET_050 = "certify/imagenet/resnet50/noise_0.50/test/sigma_0.50"
IMAGENET_025 = "certify/imagenet/resnet50/noise_0.25/test/sigma_0.25"  # ends early: 427 rows
PREDICT = "predict/imagenet/resnet50/noise_0.25/test/N_{}"


@pytest.fixture(scope="module")
def logs(fixtures_dir: Path) -> Path:
    return fixtures_dir / "cohen_logs"


def _same(df: pd.DataFrame, ref: pd.DataFrame) -> None:
    """The standard columns and all metrics agree."""
    cols = ["idx", "label", "predict", "radius", "correct"]
    pd.testing.assert_frame_equal(df[cols], ref[cols])
    np.testing.assert_allclose(df["time"], ref["time"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(certified_accuracy(df, RADII), certified_accuracy(ref, RADII))
    assert acr(df) == acr(ref) and clean_accuracy(df) == clean_accuracy(ref)
    assert abstention_rate(df) == abstention_rate(ref)


# ---------------------------------------------------------------------------------------------------------------
# The published numbers
# ---------------------------------------------------------------------------------------------------------------


def test_cifar10_published_numbers(logs):
    df = read_log(logs / CIFAR_050)
    assert len(df) == 500 and df.attrs["kind"] == "certify" and df.attrs["correct_column"] == "flags"
    np.testing.assert_allclose(certified_accuracy(df, RADII), [0.652, 0.546, 0.414, 0.320, 0.234, 0.152, 0.094],
                               rtol=0, atol=1e-12)
    assert clean_accuracy(df) == pytest.approx(0.652) and abstention_rate(df) == pytest.approx(0.166)
    assert df["time"].iloc[0] == pytest.approx(16.6)


def test_cifar10_best_over_sigma(logs):
    """Cohen et al. Table (CIFAR-10): best over sigma 0.81 / 0.60 / 0.43 / 0.32 / 0.23 / 0.17 / 0.14."""
    curves = [certified_accuracy(read_log(logs / p), RADII) for p in CIFAR_SIGMAS]
    best = envelope(curves)
    np.testing.assert_allclose(best, [0.814, 0.600, 0.428, 0.320, 0.234, 0.174, 0.140], rtol=0, atol=1e-12)
    assert np.all(best >= np.vstack(curves))


def test_imagenet_acr_and_truncated_log(logs):
    df = read_log(logs / IMAGENET_050)
    assert round(acr(df), 3) == 0.733
    np.testing.assert_allclose(certified_accuracy(df, [0.0, 0.5, 1.0, 1.5]), [0.572, 0.458, 0.372, 0.286], atol=1e-12)
    short = read_log(logs / IMAGENET_025)
    assert len(short) == 427 and short["idx"].iloc[-1] == 42600
    assert short["time"].iloc[0] == pytest.approx(2 * 60 + 31.238689)  # 0:02:31.238689


def test_all_published_logs_read_cleanly(logs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = analyze.expand_logs([logs])
        dfs = [read_log(p) for p in paths]
    assert len(paths) == 17 and not any(p.name == "README.md" for p in paths)
    assert sum(df.attrs["kind"] == "predict" for df in dfs) == 4
    for df in dfs:  # correctness is exactly predict == label (never -1); certified accuracy at 0 = clean accuracy
        assert df.attrs["correct_column"] == "flags"
        if df.attrs["kind"] == "certify":
            assert certified_accuracy(df, [0.0])[0] == clean_accuracy(df)
            assert (df.loc[df["predict"] == -1, "radius"] == 0).all()


def test_predict_logs(logs):
    df = read_log(logs / PREDICT.format(100000))
    assert df.attrs["kind"] == "predict" and df["radius"].isna().all()
    assert clean_accuracy(df) == pytest.approx(0.692) and abstention_rate(df) == pytest.approx(0.004)
    # more samples -> fewer abstentions (Cohen et al. Table 4)
    rates = [abstention_rate(read_log(logs / PREDICT.format(n))) for n in (100, 1000, 10000, 100000)]
    assert rates == sorted(rates, reverse=True) and rates[0] == pytest.approx(0.092)
    with pytest.raises(UserError, match="PREDICT log"):
        certified_accuracy(df, [0.0])
    with pytest.raises(UserError, match="N_100000"):
        acr(df)


def test_high_prob_formula(logs):
    df = read_log(logs / CIFAR_050)
    alpha, rho, n = 0.001, 0.001, 500
    expected = (certified_accuracy(df, RADII) - alpha - np.sqrt(alpha * (1 - alpha) * np.log(1 / rho) / n)
                - np.log(1 / rho) / (3 * n))
    np.testing.assert_allclose(high_prob_certified_accuracy(df, RADII, alpha, rho), expected, rtol=0, atol=1e-15)
    assert high_prob_certified_accuracy(df, [0.0], alpha, rho)[0] == pytest.approx(0.652 - 0.009320, abs=1e-6)
    with pytest.raises(UserError):
        high_prob_certified_accuracy(df, RADII, 0.0, 0.5)


# ---------------------------------------------------------------------------------------------------------------
# Log variants parse to the same numbers as the clean log
# ---------------------------------------------------------------------------------------------------------------


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    lines = path.read_text().splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


def _write(path: Path, header: list[str], rows: list[list[str]], end: str = "\n") -> Path:
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + end)
    return path


def _variants(src: Path, tmp: Path) -> dict[str, Path]:
    header, rows = _rows(src)
    assert header == ["idx", "label", "predict", "radius", "correct", "time"]
    hms = [r[:5] + [str(datetime.timedelta(seconds=float(r[5])))] for r in rows]
    tf = [r[:4] + [str(r[4] == "1")] + r[5:] for r in rows]
    total = np.cumsum([int(r[4]) for r in rows])
    running = [r[:4] + [str(t)] + r[5:] for r, t in zip(rows, total)]
    ftcadis = [r[:4] + [str(t), str(r[4] == "1")] + hms_r[5:] for r, t, hms_r in zip(rows, total, hms)]
    extra = [[r[0], "x" + r[0]] + r[1:4] + [f"{0.5 + i / 1e4:.4f}"] + r[4:] for i, r in enumerate(rows)]
    resumed = [r[:4] + [str(t + 17)] + r[5:] for r, t in zip(rows, total)]  # running total of a resumed run
    v = {
        "hms": _write(tmp / "hms", header, hms),
        "true_false": _write(tmp / "tf", header, tf),
        "running_total": _write(tmp / "running", header, running),
        "resumed_total": _write(tmp / "resumed", header, resumed),
        "ft_cadis": _write(tmp / "ftcadis", header[:4] + ["correct_num", "correct", "time"], ftcadis),
        "extra_columns": _write(tmp / "extra", ["idx", "name", *header[1:4], "pA", *header[4:]], extra),
        "no_final_newline": _write(tmp / "nonl", header, rows, end=""),
    }
    text = src.read_text()
    (tmp / "spaces").write_text(text.replace("\t", "   "))
    (tmp / "commas").write_text(text.replace("\t", ","))
    v["space_separated"], v["comma_separated"] = tmp / "spaces", tmp / "commas"
    v["blank_lines_crlf"] = tmp / "crlf"
    v["blank_lines_crlf"].write_bytes(("\n\n" + text.replace("\n", "\r\n\n")).encode())
    return v


def test_variants_parse_like_clean_log(logs, tmp_path):
    src = logs / CIFAR_050
    ref = read_log(src)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these variants is worth a warning
        for name, path in _variants(src, tmp_path).items():
            df = read_log(path)
            _same(df, ref)
            expected = "running total" if name in ("running_total", "resumed_total") else "flags"
            assert df.attrs["correct_column"] == expected, name
    ft = read_log(tmp_path / "ftcadis")
    assert ft["correct_num"].iloc[-1] == 326 and "correct_num" in ft.columns  # 0.652 * 500
    extra = read_log(tmp_path / "extra")
    assert list(extra.columns[6:]) == ["name", "pA"] and extra["name"].iloc[1] == "x20"


def test_hms_log_matches_seconds(logs, tmp_path):
    """A log with H:MM:SS times read back after rewriting them as seconds."""
    src = logs / "certify/cifar10/resnet110/noise_0.25/test/sigma_0.50"
    ref = read_log(src)
    assert ref["time"].iloc[0] == pytest.approx(14.206886)
    header, rows = _rows(src)
    secs = [r[:5] + [repr(float(t))] for r, t in zip(rows, ref["time"])]
    _same(read_log(_write(tmp_path / "secs", header, secs)), ref)
    days = [r[:5] + ["1 day, " + r[5]] for r in rows]
    assert read_log(_write(tmp_path / "days", header, days))["time"].iloc[0] == pytest.approx(86400 + 14.206886)


@pytest.mark.parametrize("partial", ["999", "99999\t3\t3", "99999\t3\t3\t0.51", "99999\t3\t3\t0.512\t1",
                                     "99999\t3\t3\t0.512\tTr", "99999\t3\t3\t0.512\t1\t0:00:1x"])
def test_truncated_last_line(logs, tmp_path, partial):
    """Cut inside idx, predict, radius, correct, time: the row is dropped with one warning."""
    src = logs / CIFAR_050
    path = tmp_path / "trunc"
    path.write_text(src.read_text() + partial)
    with pytest.warns(LogWarning, match="incomplete last line") as record:
        df = read_log(path)
    assert len(record) == 1 and df.attrs["dropped"] == 1
    _same(df, read_log(src))


def test_truncated_last_line_keeps_complete_time(logs, tmp_path):
    text = (logs / CIFAR_050).read_text()
    path = tmp_path / "t"
    path.write_text(text + "99999\t3\t3\t0.512\t1\t17.")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = read_log(path)
    assert len(df) == 501 and df["radius"].iloc[-1] == 0.512


def test_inconsistent_correct_column_warns(logs, tmp_path):
    header, rows = _rows(logs / CIFAR_050)
    flipped = [r[:4] + [("0" if r[4] == "1" else "1") if i < 3 else r[4]] + r[5:] for i, r in enumerate(rows)]
    with pytest.warns(LogWarning, match="disagrees with predict == label on 3 row"):
        df = read_log(_write(tmp_path / "bad", header, flipped))
    _same(df, read_log(logs / CIFAR_050))


# ---------------------------------------------------------------------------------------------------------------
# Metrics on small hand-made logs
# ---------------------------------------------------------------------------------------------------------------


def test_metrics_by_hand(tmp_path):
    path = tmp_path / "tiny.tsv"
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
                    "0\t1\t1\t0.3\t1\t1.0\n"   # correct, radius 0.3
                    "1\t2\t2\t0.75\t1\t1.0\n"  # correct, radius 0.75
                    "2\t3\t-1\t0.0\t0\t1.0\n"  # abstain
                    "3\t4\t5\t2.0\t0\t1.0\n")  # wrong, large radius: counts 0
    df = read_log(path)
    # 0.1 * 3 = 0.30000000000000004 must still count radius 0.3; 0.75 is included at r = 0.75 (radius >= r)
    np.testing.assert_allclose(certified_accuracy(df, [0.0, 0.1 * 3, 0.3 + 1e-6, 0.75, 0.76]),
                               [0.5, 0.5, 0.25, 0.25, 0.0])
    assert acr(df) == pytest.approx((0.3 + 0.75) / 4)
    assert abstention_rate(df) == 0.25 and clean_accuracy(df) == 0.5
    np.testing.assert_array_equal(envelope([[0.1, 0.5], [0.3, 0.2]]), [0.3, 0.5])
    np.testing.assert_array_equal(analyze.radius_grid(0, 1.5, 0.25), RADII)
    assert analyze.radius_grid(0, 0.3, 0.1)[-1] == 0.3 and len(analyze.radius_grid(0, 0.3, 0.1)) == 4
    np.testing.assert_array_equal(analyze.default_radii([df]), [0.0, 0.25, 0.5, 0.75])


def test_default_labels():
    paths = ["/x/cohen/noise_0.25/test/sigma_0.25", "/x/cohen/noise_0.50/test/sigma_0.50"]
    assert analyze.default_labels(paths) == ["noise_0.25/sigma_0.25", "noise_0.50/sigma_0.50"]
    assert analyze.default_labels(["/a/b/noise_0.50/test/sigma_0.50"]) == ["noise_0.50/test/sigma_0.50"]
    assert analyze.default_labels(["/a/b/log", "/a/c/log"]) == ["b/log", "c/log"]


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


def _latex_rows(tex: str) -> list[list[str]]:
    body = tex.split(r"\toprule")[1].split(r"\bottomrule")[0]
    return [line.rstrip(" \\").split(" & ") for line in body.splitlines()
            if line.endswith(r"\\") and r"\multicolumn" not in line]


def test_latex_structure(logs, tmp_path):
    paths = [str(logs / p) for p in CIFAR_SIGMAS]
    out = tmp_path / "table.tex"
    analyze.main([*paths, "--labels", "σ=0.12", "σ=0.25", "σ=0.50", "σ=1.00", "--radii", "0", "1.5", "0.25",
                  "--format", "latex", "--out", str(out), "--envelope"])
    tex = out.read_text()
    assert tex.count(r"\begin{tabular}") == 1 and tex.count(r"\end{tabular}") == 1
    assert tex.index(r"\begin{tabular}") < tex.index(r"\toprule") < tex.index(r"\midrule") \
        < tex.index(r"\bottomrule") < tex.index(r"\end{tabular}")
    spec = re.search(r"\\begin\{tabular\}\{([a-z|]+)\}", tex).group(1)
    assert spec == "l" + "c" * 8  # label, 7 radii, ACR
    rows = _latex_rows(tex)
    assert rows[0][0] == "Model" and rows[0][-1] == "ACR" and len(rows) == 1 + 4 + 1
    assert all(len(r) == len(spec) for r in rows)
    assert rows[1][0] == r"$\sigma$=0.12" and rows[-1][0] == "envelope (best)" and rows[-1][-1] == "--"
    body = rows[1:5]  # one bold per column, and it is the column maximum
    for j in range(1, len(spec)):
        bold = [i for i, r in enumerate(body) if r[j].startswith(r"\textbf{")]
        assert len(bold) == 1, (j, [r[j] for r in body])
        values = [float(r[j].replace(r"\textbf{", "").rstrip("}")) for r in body]
        assert values[bold[0]] == max(values)
    assert rows[3][1:8] == ["0.652", "0.546", "0.414", r"\textbf{0.320}", r"\textbf{0.234}", "0.152", "0.094"]
    assert [r[-1] for r in body] == ["0.270", "0.429", "0.538", r"\textbf{0.542}"]
    assert "$r = 0.00$" in tex and r"\ell_2" in tex


def test_console_markdown_csv(logs, tmp_path, capsys):
    analyze.main([str(logs / CIFAR_050)])  # defaults: radii 0..max step 0.25 and the stats columns
    out = capsys.readouterr().out
    header = out.splitlines()[1].split()
    assert header[:2] == ["log", "0.00"] and header[-4:] == ["ACR", "clean", "abstain", "n"]
    assert "noise_0.50/test/sigma_0.50" in out and "0.652  0.546  0.414" in out and out.rstrip().endswith("500")

    analyze.main([str(logs / p) for p in CIFAR_SIGMAS[:2]] + ["--radii", "0", "0.5", "0.25", "--format", "markdown"])
    md = capsys.readouterr().out
    assert "| log | 0.00 | 0.25 | 0.50 | ACR | clean | abstain | n |" in md
    assert "| noise_0.12/sigma_0.12 | **0.814** | 0.586 |" in md and "**0.600**" in md

    csv = tmp_path / "t.csv"
    table = analyze.main([str(logs / CIFAR_050), str(logs / PREDICT.format(100)), "--radii", "0", "1.5", "0.25",
                          "--format", "csv", "--out", str(csv)])
    back = pd.read_csv(csv, index_col=0)
    assert list(back.columns) == ["0.00", "0.25", "0.50", "0.75", "1.00", "1.25", "1.50", "ACR", "clean",
                                  "abstain", "n"]
    np.testing.assert_allclose(back.iloc[0, :7], [0.652, 0.546, 0.414, 0.320, 0.234, 0.152, 0.094])
    assert back.iloc[1, :8].isna().all() and back.iloc[1]["clean"] == pytest.approx(0.66)
    assert table.shape == (2, 11)


@pytest.mark.slow
def test_plots(logs, tmp_path):
    paths = [str(logs / p) for p in CIFAR_SIGMAS]
    png, pdf = tmp_path / "curve.png", tmp_path / "sub" / "curve.pdf"
    analyze.main([*paths, "--plot", str(png), "--envelope", "--out", str(tmp_path / "t.txt")])
    analyze.main([*paths, "--plot", str(pdf), "--high-prob", "0.001", "0.001", "--out", str(tmp_path / "u.txt")])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5_000
    from matplotlib.image import imread
    image = imread(png)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 400


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"\n  \n\n", "empty file"),
    (b"idx\tlabel\tpredict\tradius\tcorrect\ttime\n", "no complete rows"),
    (b"idx\tradius\tcorrect\n0\t0.5\t1\n", "no column label, predict"),
    (b"Lorem ipsum dolor sit amet,\nconsectetur adipiscing elit.\n", "not a certification log"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    (b"\xff\xfe\xfa bad utf8", "not UTF-8"),
    (b"idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\tabc\t1\t1.0\n1\t1\t1\t0.5\t1\t1.0\n", "line 2"),
    (b"idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\n1\t1\t1\t0.5\t1\t1.0\n", "line 2 is malformed"),
])
def test_bad_logs(tmp_path, content, message):
    path = tmp_path / "weird_log.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as err:
        read_log(path)
    assert "weird_log.txt" in str(err.value) and "\n" not in str(err.value)


def test_bad_cli_input(logs, tmp_path):
    log = str(logs / CIFAR_050)
    cases = [
        ([str(tmp_path / "missing.tsv")], "missing.tsv: no such file"),
        ([log, "--labels", "a", "b"], "--labels: got 2 labels for 1 logs"),
        ([log, "--radii", "1", "0", "0.25"], "--radii"),
        ([log, "--radii", "0", "1", "0"], "--radii"),
        ([log, "--plot", str(tmp_path / "x.jpg")], "must end in .png or .pdf"),
        ([log, "--high-prob", "0.001", "2"], "--high-prob"),
        ([str(logs / PREDICT.format(100)), "--envelope"], "needs at least one CERTIFY log"),
        ([str(tmp_path)], "holds no certification logs"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            analyze.main(argv)


def test_cli_exit_code(tmp_path):
    """Through run_cli: one 'error:' line naming the file, exit status 2, no traceback."""
    bad = tmp_path / "not_a_log.bin"
    bad.write_bytes(bytes(range(256)))
    proc = subprocess.run([sys.executable, str(REPO / "analyze.py"), str(bad)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and "not_a_log.bin" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


HEADER_BYTES = b"idx\tlabel\tpredict\tradius\tcorrect\ttime\n"


@pytest.mark.parametrize("row3, message", [
    (b"2\t3\t3\tnan\t1\t1.0\n", r"line 4 has radius nan; a certified radius is a finite number >= 0"),
    (b"2\t3\t3\tinf\t1\t1.0\n", r"line 4 has radius inf"),
    (b"2\t3\t3\t-0.5\t1\t1.0\n", r"line 4 has radius -0.5"),
    (b"0\t1\t4\t0.3\t0\t1.0\n", r"lines 2 and 4 both certify idx 0 with different results"),
])
def test_impossible_radii_and_conflicting_repeats_are_errors(tmp_path, cli_error, files_of, row3, message):
    log = tmp_path / "log.tsv"
    log.write_bytes(HEADER_BYTES + b"0\t1\t1\t0.5\t1\t1.0\n1\t2\t2\t0.25\t1\t1.0\n" + row3)
    before = files_of(tmp_path)
    line = cli_error(analyze.main, [log, "--out", tmp_path / "t.txt", "--plot", tmp_path / "p.png"])
    assert re.search(rf"^error: {re.escape(str(log))}: {message}", line), line
    assert files_of(tmp_path) == before


def test_repeated_rows_of_one_result_are_skipped_with_a_warning(tmp_path):
    rows = b"0\t1\t1\t0.5\t1\t1.0\n1\t2\t-1\t0.0\t0\t1.0\n"
    log = tmp_path / "log.tsv"
    log.write_bytes(HEADER_BYTES + rows + b"0\t1\t1\t0.5\t1\t2.5\n")  # an appended re-run of image 0
    with pytest.warns(LogWarning, match=r"skipped 1 repeated row\(s\) .*\(line\(s\) 4\)"):
        df = read_log(log)
    assert df["idx"].tolist() == [0, 1] and df["time"].tolist() == [1.0, 1.0]
    assert acr(df) == pytest.approx(0.25)  # counted once: (0.5 + 0) / 2


def test_outputs_onto_inputs_or_under_a_file_are_refused(logs, tmp_path, cli_error, files_of):
    log = tmp_path / "log.tsv"
    shutil.copy(logs / CIFAR_050, log)
    (tmp_path / "file.txt").write_text("x")
    before = files_of(tmp_path)
    cases = [
        ([log, "--out", log], rf"--out {re.escape(str(log))}: is one of the logs read"),
        ([log, "--out", tmp_path / "." / "log.tsv"], r"--out .*: is one of the logs read"),
        ([tmp_path, "--out", log], r"--out .*: is one of the logs read"),  # a folder's logs count too
        ([log, "--out", tmp_path / "t.png", "--plot", tmp_path / "t.png"], r"--out and --plot name the same file"),
        ([log, "--out", tmp_path / "file.txt" / "t.txt"], r"--out .*file\.txt is a file, not a folder"),
        ([log, "--plot", tmp_path / "file.txt" / "p.png"], r"--plot .*file\.txt is a file, not a folder"),
        ([log, "--out", tmp_path], r"--out .*: is a folder; name a file"),
    ]
    for argv, message in cases:
        assert re.search(message, cli_error(analyze.main, argv)), argv
    assert files_of(tmp_path) == before
