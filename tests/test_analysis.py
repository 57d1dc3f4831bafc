"""analysis.py: Cohen et al.'s analysis API (run by a script in Cohen's style on their published logs) and the
paper-style tables."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import analysis
import analyze
from runkit.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "fixtures" / "cohen_style_analysis.py"
CIFAR = "certify/cifar10/resnet110/noise_{0}/test/sigma_{0}"
IMAGENET = "certify/imagenet/resnet50/noise_{0}/test/sigma_{0}"


def _raw_rows(path: Path) -> list[tuple[bool, float]]:
    """(predict == label, radius) per row, straight from the file (independent of read_log)."""
    with open(path, newline="") as f:
        return [(r["predict"] == r["label"], float(r["radius"])) for r in csv.DictReader(f, delimiter="\t")]


def _raw_acr(path: Path) -> float:
    rows = _raw_rows(path)
    return sum(radius for ok, radius in rows if ok) / len(rows)


def _raw_percent(path: Path, radius: float) -> float:
    rows = _raw_rows(path)
    return 100 * sum(ok and r >= radius for ok, r in rows) / len(rows)


def _numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"(?<![=\w.])-?\d+\.\d+", line)]


@pytest.fixture(scope="module")
def cohen_run(cohen_logs, tmp_path_factory) -> tuple[Path, str]:
    """The Cohen-style script run unchanged from a directory whose data/ is the published logs."""
    work = tmp_path_factory.mktemp("cohen")
    (work / "data").symlink_to(cohen_logs)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return work / "analysis", proc.stdout


@pytest.mark.slow
def test_cohen_script_reproduces_published_cifar10_table(cohen_run):
    """Cohen et al. (2019) Table 1, CIFAR-10, best sigma per radius: 60 / 43 / 32 / 23 / 17 / 14 % at r = 0.25..1.5."""
    out, _ = cohen_run
    lines = (out / "latex" / "vary_noise_cifar10").read_text().splitlines()
    assert lines[0] == r"& $r = 0.25$& $r = 0.5$& $r = 0.75$& $r = 1.0$& $r = 1.25$& $r = 1.5$\\"
    assert lines[1] == r"\midrule" and len(lines) == 6
    table = np.array([_numbers(line.split("$ ", 1)[1]) for line in lines[2:]])
    np.testing.assert_array_equal(table[2], [0.55, 0.41, 0.32, 0.23, 0.15, 0.09])  # sigma = 0.50
    np.testing.assert_array_equal(table.max(axis=0), [0.60, 0.43, 0.32, 0.23, 0.17, 0.14])
    bold = [[bool(re.search(r"\\textbf", c)) for c in line.split(" & ")[1:]] for line in lines[2:]]
    assert np.array_equal(np.array(bold).argmax(axis=0), table.argmax(axis=0)) and np.array(bold).sum() == 6


@pytest.mark.slow
def test_cohen_script_reproduces_published_imagenet_table(cohen_run):
    """Cohen et al. Table 1, ImageNet: 49 / 37 / 29 / 19 / 15 / 12 % at r = 0.5..3.0 (best sigma, marked *)."""
    out, _ = cohen_run
    md = (out / "markdown" / "vary_noise_imagenet").read_text().splitlines()
    assert md[0] == "|  | r = 0.0 |r = 0.5 |r = 1.0 |r = 1.5 |r = 2.0 |r = 2.5 |r = 3.0 |"
    assert md[1] == "| --- | " + " --- |" * 7 and md[2].startswith("<b> &sigma; = 0.25 </b>| ")
    cells = [line.split("</b>| ")[1].rstrip(" |").split(" |") for line in md[2:]]
    starred = [[float(c.split("<b>")[0]) for c in col if c.endswith("<b>*</b>")] for col in zip(*cells)]
    assert all(len(s) == 1 for s in starred)
    assert [s[0] for s in starred] == [0.67, 0.49, 0.37, 0.29, 0.19, 0.15, 0.12]


@pytest.mark.slow
def test_cohen_script_acr_table_plots_and_direct_calls(cohen_run, cohen_logs):
    out, stdout = cohen_run
    lines = (out / "latex" / "vary_noise_cifar10_acr").read_text().splitlines()
    assert lines[0].startswith(r"& ACR & $r = 0.0$& $r = 0.25$") and lines[1] == r"\midrule"
    for line, s in zip(lines[2:], ("0.12", "0.25", "0.50", "1.00")):
        label, acr, *acc = line.rstrip("\\").split(" & ")
        assert label == f"$\\sigma = {s}$" and acr == f"{_raw_acr(cohen_logs / CIFAR.format(s)):.3f}"
        assert all(re.fullmatch(r"\d+\.\d", a) for a in acc) and len(acc) == 7
    assert lines[4].rstrip("\\").split(" & ")[1:] == ["0.538", "65.2", "54.6", "41.4", "32.0", "23.4", "15.2", "9.4"]
    for name in ("vary_noise_cifar10", "high_prob"):
        assert (out / "plots" / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cifar10 sigma=0.50 at_radii 0.652 0.546 0.414 0.320 0.234 0.152 0.094" in stdout
    assert "cifar10 sigma=0.50 acr 0.538" in stdout


def test_cohen_classes(cohen_logs, tmp_path):
    path = str(cohen_logs / IMAGENET.format("0.50"))
    radii = np.array([0.0, 0.5, 1.0])
    approx = analyze.ApproximateAccuracy(path)
    high = analyze.HighProbAccuracy(path, 0.001, 0.001)
    np.testing.assert_allclose(approx.at_radii(radii), [0.572, 0.458, 0.372], rtol=0, atol=1e-12)
    n, log_term = 500, np.log(1000)
    gap = 0.001 + np.sqrt(0.001 * 0.999 * log_term / n) + log_term / (3 * n)
    np.testing.assert_allclose(high.at_radii(radii), approx.at_radii(radii) - gap, rtol=0, atol=1e-12)
    assert approx.at_radius(analysis.read_log(path), 0.5) == pytest.approx(0.458)
    assert approx.acr() == pytest.approx(_raw_acr(Path(path)), abs=1e-12)
    line = analyze.Line(high, "hp")
    assert (line.plot_fmt, line.scale_x) == ("", 1)
    with pytest.raises(UserError, match="'hp' has no ACR"):
        analyze.latex_table_certified_accuracy_acr(str(tmp_path / "t"), 0, 1, 0.5, [line])
    with pytest.raises(UserError, match="plot_certified_accuracy"):
        analyze.plot_certified_accuracy(str(tmp_path / "p"), "t", 1.0, [line], radius_step=0.0)
    analyze.smallplot_certified_accuracy(str(tmp_path / "small"), "unused", 2.0, [analyze.Line(approx, "a", "k-")])
    assert (tmp_path / "small.pdf").read_bytes()[:5] == b"%PDF-" and not (tmp_path / "small.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# Paper-style tables
# ---------------------------------------------------------------------------------------------------------------

RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
SIGMAS = ("0.12", "0.25", "0.50", "1.00")


def _md_rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()[4:] if line.startswith("|")]


def test_paper_markdown_one_method_over_sigma(cohen_logs, tmp_path):
    """Each cell as computed straight from the files; bold = best sigma per column; the envelope row is Cohen et
    al.'s Table 1 (CIFAR-10, r = 0.25..1.5: 60 / 43 / 32 / 23 / 17 / 14 %) with the clean accuracy of that sigma."""
    paths = [cohen_logs / CIFAR.format(s) for s in SIGMAS]
    out = tmp_path / "t.md"
    analyze.main([*map(str, paths), "--style", "paper", "--format", "markdown", "--radii", "0", "1.5", "0.25",
                  "--labels", *["Cohen"] * 4, "--envelope", "--out", str(out)])
    md = out.read_text()
    assert md.splitlines()[2] == "| σ | method | ACR | 0.00 | 0.25 | 0.50 | 0.75 | 1.00 | 1.25 | 1.50 |"
    rows = _md_rows(md)
    assert [r[:2] for r in rows] == [[s, "Cohen"] for s in SIGMAS] + [["best of σ ∈ {0.12, 0.25, 0.50, 1.00}",
                                                                        "Cohen"]]
    expected = [[f"{_raw_acr(p):.3f}"] + [f"{_raw_percent(p, r):.1f}" for r in RADII] for p in paths]
    assert [[c.strip("*") for c in r[2:]] for r in rows[:4]] == expected
    shown = np.array([[float(c.strip("*")) for c in r[2:]] for r in rows[:4]])
    for j in range(shown.shape[1]):  # bold exactly where the column is best
        assert [r[2 + j].startswith("**") for r in rows[:4]] == list(shown[:, j] == shown[:, j].max()), j
    env = [c.split(" (") for c in rows[4][3:]]
    assert rows[4][2] == "-" and [float(v) for v, _ in env] == [81.4, 60.0, 42.8, 32.0, 23.4, 17.4, 14.0]
    clean = [round(_raw_percent(p, 0.0), 1) for p in paths]
    assert [float(c.rstrip(")")) for _, c in env] == [clean[0], clean[1], clean[1], clean[2], clean[2], clean[3],
                                                      clean[3]]


def test_paper_latex_methods_grouped_by_sigma(cohen_logs, tmp_path):
    """Two methods at sigma 0.50 (Cohen's matched model and the one trained at 1.00): bold within the group."""
    paths = [cohen_logs / CIFAR.format("0.25"), cohen_logs / CIFAR.format("0.50"),
             cohen_logs / "certify/cifar10/resnet110/noise_1.00/test/sigma_0.50"]
    tex = analyze.main([*map(str, paths), "--style", "paper", "--format", "latex", "--radii", "0", "1.0", "0.5",
                        "--labels", "matched", "matched", "train 1.00", "--out", str(tmp_path / "t.tex")])
    text = (tmp_path / "t.tex").read_text()
    assert r"\begin{tabular}{llcccc}" in text and text.count(r"\midrule") == 2 and r"\bottomrule" in text
    body = [line.rstrip(" \\").split(" & ") for line in text.splitlines() if line.count(" & ") == 5][1:]
    assert [r[:2] for r in body] == [["0.25", "matched"], ["0.50", "matched"], ["", "train 1.00"]]
    assert body[0][2:] == ["0.429", "74.8", "42.8", "0.0"]  # alone in its group: nothing bold
    expected = [[f"{_raw_acr(p):.3f}"] + [f"{_raw_percent(p, r):.1f}" for r in (0.0, 0.5, 1.0)] for p in paths[1:]]
    assert body[1][2:] == [r"\textbf{" + expected[0][0] + "}", r"\textbf{65.2}", r"\textbf{41.4}", "23.4"]
    assert body[2][2:] == expected[1][:3] + [r"\textbf{" + expected[1][3] + "}"]
    assert list(tex.index) == [("0.25", "matched"), ("0.50", "matched"), ("0.50", "train 1.00")]


def test_paper_sigma_sources_and_errors(cohen_logs, tmp_path):
    log = tmp_path / "ours.tsv"
    log.write_text((cohen_logs / CIFAR.format("0.50")).read_text())
    assert analysis.log_sigma(cohen_logs / CIFAR.format("0.25")) == 0.25 and analysis.log_sigma(log) is None
    (tmp_path / "ours.tsv.json").write_text('{"config": {"sigma": 0.5}}')
    assert analysis.log_sigma(log) == 0.5
    other = tmp_path / "other.tsv"
    other.write_text(log.read_text())
    with pytest.raises(UserError, match=r"no sigma known for .*other.tsv.*pass --sigmas"):
        analyze.main([str(log), str(other), "--style", "paper"])
    table = analyze.main([str(log), str(other), "--style", "paper", "--sigmas", "0.5", "0.25",
                          "--radii", "0", "0", "1"])
    assert list(table.index) == [("0.25", "other.tsv"), ("0.50", "ours.tsv")]
    cases = [([str(log), str(log), "--labels", "a", "a"], "two logs for method 'a' at sigma 0.5"),
             ([str(log), "--sigmas", "0.5", "1"], "--sigmas: got 2 values for 1 logs"),
             ([str(log), "--format", "csv"], "--format latex or markdown"),
             ([str(cohen_logs / "predict/imagenet/resnet50/noise_0.25/test/N_100"), "--sigmas", "0.25"], "PREDICT")]
    for argv, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            analyze.main([*argv, "--style", "paper"])


# ---------------------------------------------------------------------------------------------------------------
# Training curves (analyze.py --train)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_curves_of_a_tiny_digits_run(tmp_path):
    """A 4-step train.py run on digits: its step and epoch logs plotted, one panel per quantity."""
    import train

    run = tmp_path / "run"
    train.main(["--dataset", "digits", "--denoiser_ckpt", str(REPO / "models/digits_denoiser.pt"),
                "--classifier_ckpt", str(REPO / "models/digits_vit_tiny.pt"), "--device", "cpu", "--batch", "8",
                "--num_noises", "2", "--workers", "0", "--log_every", "1", "--test_per_class", "1",
                "--train_noise_sd", "0.25", "--epochs", "1", "--max_steps", "4", "--no_progress", "--outdir", str(run)])
    panels = analyze.main(["--train", str(run)])
    assert list(panels)[:4] == ["loss and its parts", "accuracy", "masked-in share", "learning rate"]
    assert {"log_steps.txt:loss", "log_steps.txt:sce", "log_steps.txt:madv", "log.txt:train_loss"} <= set(
        panels["loss and its parts"])
    assert {"log_steps.txt:acc", "log.txt:train_acc", "log.txt:test_acc"} <= set(panels["accuracy"])
    assert "log_steps.txt:masked_in" in panels["masked-in share"]
    assert not any(c.endswith((":step", ":epoch", ":time")) for cols in panels.values() for c in cols)
    assert (run / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "training_curves.pdf").read_bytes()[:5] == b"%PDF-"
    steps = analysis.read_training_log(run / "log_steps.txt")
    assert list(steps["step"]) == [1, 2, 3, 4] and steps["loss"].notna().all()


def test_train_curves_written_logs_and_errors(tmp_path):
    """New columns get their own panel; a half-written last line is dropped; bad input is one clear error."""
    (tmp_path / "log_steps.txt").write_text("step\tepoch\tlr\tloss\tgrad_norm\timages_per_s\n"
                                            "10\t1\t0.001\t2.3\t1.5\t120\n20\t1\t0.002\t2.1\t1.2\t125\n30\t1\t0.0")
    out = tmp_path / "curves.pdf"
    panels = analyze.main(["--train", str(tmp_path), "--plot", str(out)])
    assert panels == {"loss and its parts": ["log_steps.txt:loss"], "learning rate": ["log_steps.txt:lr"],
                      "grad_norm": ["log_steps.txt:grad_norm"], "images_per_s": ["log_steps.txt:images_per_s"]}
    assert out.read_bytes()[:5] == b"%PDF-" and not (tmp_path / "training_curves.png").exists()
    assert len(analysis.read_training_log(tmp_path / "log_steps.txt")) == 2
    (tmp_path / "log.txt").write_text("epoch\tstep\tloss\n1\t20\tx\n")
    cases = [(["--train", str(tmp_path)], "log.txt: line 2 is malformed"),
             (["--train", str(tmp_path / "empty")], "no log_steps.txt or log.txt"),
             (["--train", str(tmp_path), "x.tsv"], "give no logs with it"),
             ([], "give the logs to analyze")]
    (tmp_path / "empty").mkdir()
    for argv, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            analyze.main(argv)


def test_samples_per_image_of_logs_with_column_n(tmp_path):
    """A log with the column n (certify.py --sequential / --skip_wrong) gets samples/img, its mean; others '-'."""
    from runkit.logs import HEADER

    (tmp_path / "seq.tsv").write_text(HEADER + "\tn\n0\t1\t1\t0.5\t1\t0.1\t400\n1\t2\t3\t0.0\t0\t0.1\t0\n"
                                      "2\t2\t2\t0.25\t1\t0.1\t1100\n")
    (tmp_path / "fixed.tsv").write_text(HEADER + "\n0\t1\t1\t0.5\t1\t0.1\n")
    dfs = [analyze.read_log(tmp_path / name) for name in ("seq.tsv", "fixed.tsv")]
    table = analysis.summary_table(dfs, ["seq", "fixed"], np.array([0.0, 0.5]))
    assert table.loc["seq", analysis.SAMPLES_COLUMN] == 500.0 and np.isnan(table.loc["fixed", analysis.SAMPLES_COLUMN])
    text = analysis.format_text(table)
    assert "samples/img" in text and "500" in text.split("\n")[3]
    assert analysis.SAMPLES_COLUMN not in analysis.summary_table(dfs[1:], ["fixed"], np.array([0.0])).columns


# ---------------------------------------------------------------------------------------------------------------
# Sigmas that are no noise level; labels that would break a Markdown table
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "NaN", "Infinity", "0"])
def test_paper_style_refuses_a_sidecar_sigma_that_is_no_noise_level(cohen_logs, tmp_path, cli_error, value):
    log = tmp_path / "ours.tsv"
    log.write_text((cohen_logs / CIFAR.format("0.50")).read_text())
    (tmp_path / "ours.tsv.json").write_text('{"config": {"sigma": %s}}' % value)
    line = cli_error(analyze.main, [log, "--style", "paper", "--format", "markdown"])
    assert "ours.tsv.json" in line and "sigma" in line and "finite number > 0" in line


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "0"])
def test_paper_style_refuses_sigmas_that_are_no_noise_level(cohen_logs, cli_error, value):
    line = cli_error(analyze.main, [cohen_logs / CIFAR.format("0.50"), "--style", "paper", "--sigmas", value])
    assert line.startswith(f"error: --sigmas {value}") and "finite number > 0" in line


def test_markdown_escapes_pipes_and_newlines_in_labels(cohen_logs):
    path = str(cohen_logs / CIFAR.format("0.50"))
    plain = analyze.main([path, path, "--labels", "a|b", "c\nd", "--format", "markdown", "--radii", "0", "0.5", "0.25"])
    text = analysis.format_markdown(plain)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[1].startswith(r"| a\|b | ") and rows[2].startswith("| c d | ") and len(rows) == 3
    assert all(len(re.split(r"(?<!\\)\|", row)) == len(re.split(r"(?<!\\)\|", rows[0])) for row in rows)
    paper = analyze.main([path, path, "--labels", "a|b", "c\nd", "--style", "paper", "--sigmas", "0.5", "0.5",
                          "--format", "markdown", "--radii", "0", "0.5", "0.25"])
    rows = [line for line in analysis.format_paper_markdown(paper).splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[1] for row in rows[1:]] == [r"a\|b", "c d"]


# ---------------------------------------------------------------------------------------------------------------
# Sequential CERTIFY logs: the radius column is the radius at the stop, so their ACR is a lower bound
# ---------------------------------------------------------------------------------------------------------------


def _sequential_and_fixed(cohen_logs: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The same rows twice, one recorded as sequential CERTIFY (its sidecar), one as fixed-N."""
    text = (cohen_logs / CIFAR.format("0.50")).read_text()
    seq, fixed = tmp_path / "seq.tsv", tmp_path / "fixed.tsv"
    for path, mode in ((seq, "sequential"), (fixed, "fixed")):
        path.write_text(text)
        path.with_name(path.name + ".json").write_text(
            '{"config": {"dataset": "cifar10", "sigma": 0.5, "mode": "%s"}, "info": {}}' % mode)
    return seq, fixed


def test_sequential_log_acr_is_shown_as_a_lower_bound(cohen_logs, tmp_path, capsys):
    seq, fixed = _sequential_and_fixed(cohen_logs, tmp_path)
    acr_value = _raw_acr(seq)
    table = analyze.main([str(seq), str(fixed), "--radii", "0", "0.5", "0.25"])
    out = capsys.readouterr().out
    assert np.isnan(table.loc["seq.tsv", "ACR"]) and table.loc["seq.tsv", "ACR≥"] == pytest.approx(acr_value)
    assert table.loc["fixed.tsv", "ACR"] == pytest.approx(acr_value) and np.isnan(table.loc["fixed.tsv", "ACR≥"])
    header, seq_row = out.splitlines()[1], next(line for line in out.splitlines() if line.startswith("seq.tsv"))
    assert header.split()[4:6] == ["ACR", "ACR≥"] and seq_row.split()[4:6] == ["-", f"{acr_value:.3f}"]
    assert "radius at the stop" in out.splitlines()[0] and "lower bound" in out.splitlines()[0]
    assert "ACR≥" in analysis.format_markdown(table) and r"ACR$\geq$" in analysis.format_latex(table)
    csv_text = analysis.format_csv(table).splitlines()
    assert csv_text[0].split(",")[4:6] == ["ACR", "ACR≥"] and csv_text[1].split(",")[4] == ""


def test_sequential_log_in_the_paper_style_and_cohen_api(cohen_logs, tmp_path):
    seq, fixed = _sequential_and_fixed(cohen_logs, tmp_path)
    acr_value = f"{_raw_acr(seq):.3f}"
    argv = [str(seq), str(fixed), "--style", "paper", "--radii", "0", "0.5", "0.25"]
    md = analysis.format_paper_markdown(analyze.main(argv + ["--format", "markdown"]))
    rows = {r[1]: r for r in _md_rows(md)}
    assert rows["seq.tsv"][2] == f"≥{acr_value}" and rows["fixed.tsv"][2] == acr_value  # a bound is never bold
    assert "lower bound" in md.splitlines()[0]
    tex = analysis.format_paper_latex(analyze.main(argv + ["--format", "latex"]))
    assert f"$\\geq${acr_value}" in tex
    with pytest.warns(analysis.LowerBoundWarning, match="radius at the stop"):
        value = analyze.ApproximateAccuracy(str(seq)).acr()
    assert value == pytest.approx(float(acr_value), abs=5e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        analyze.ApproximateAccuracy(str(fixed)).acr()


def test_certify_sequential_sidecar_says_radius_at_the_stop_and_cohens_reader_reads_the_log(tmp_path):
    """certify.py --sequential: the sidecar says what the radius column is; the log itself stays a plain Cohen log
    (no comment line), so pandas.read_csv(sep="\\t") as Cohen's and the paper's analyze.py use it reads it."""
    import pandas as pd

    import certify

    out = tmp_path / "seq.tsv"
    certify.main(["--dataset", "digits", "--device", "cpu", "--no_progress", "--seed", "2", "--N0", "10",
                  "--precision", "fp32", "--denoiser_ckpt", str(REPO / "models" / "digits_denoiser.pt"),
                  "--classifier_ckpt", str(REPO / "models" / "digits_vit_tiny.pt"), "--sigma", "0.5", "--N", "300",
                  "--max_images", "3", "--sequential", "--outfile", str(out)])
    config = analysis.log_config(out)
    assert config["mode"] == "sequential" and "radius at the stop" in config["radius"]
    df = pd.read_csv(out, sep="\t")
    assert list(df.columns) == ["idx", "label", "predict", "radius", "correct", "time", "n"] and len(df) == 3
    assert analysis.is_sequential(out)
    with pytest.warns(analysis.LowerBoundWarning):
        analyze.ApproximateAccuracy(str(out)).acr()
