"""analysis.py: Cohen et al.'s analysis API (run by a script in Cohen's style on their published logs) and the
paper-style tables."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import analysis
import analyze
from utils import UserError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "fixtures" / "cohen_style_analysis.py"
CIFAR = "certify/cifar10/resnet110/noise_{0}/test/sigma_{0}"
IMAGENET = "certify/imagenet/resnet50/noise_{0}/test/sigma_{0}"


def _raw_acr(path: Path) -> float:
    """ACR straight from the file: mean over rows of radius where predict == label (independent of read_log)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return sum(float(r["radius"]) for r in rows if r["predict"] == r["label"]) / len(rows)


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
