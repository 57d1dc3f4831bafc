"""The published tables (tables/*.json, published.py) and analyze.py --compare: your rows beside the paper's."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import analysis
import analyze
import published
from runkit.errors import UserError

CIFAR = "certify/cifar10/resnet110/noise_{0}/test/sigma_{0}"
IMAGENET = "certify/imagenet/resnet50/noise_{0}/test/sigma_{0}"
# what each source table holds (locuslab/smoothing analysis/latex/vary_noise_cifar10 and vary_noise_imagenet)
SHIPPED = {"cohen2019_cifar10": ("cifar10", (0.25, 0.5, 0.75, 1.0, 1.25, 1.5), (0.12, 0.25, 0.5, 1.0)),
           "cohen2019_imagenet": ("imagenet", (0.5, 1.0, 1.5, 2.0, 2.5, 3.0), (0.25, 0.5, 1.0))}


def _tables() -> dict[str, published.PublishedTable]:
    return {t.name: t for t in published.load_tables()}


def test_shipped_tables_are_complete_and_consistent():
    tables = _tables()
    assert sorted(tables) == sorted(SHIPPED)
    for name, (dataset, radii, sigmas) in SHIPPED.items():
        table = tables[name]
        raw = json.loads((published.TABLES / f"{name}.json").read_text())
        assert raw["source"].startswith("github.com/locuslab/smoothing analysis/") and "table" in raw
        assert (table.dataset, table.split, table.radii) == (dataset, "test", radii)
        assert tuple(row.sigma for row in table.rows) == sigmas and not table.has_acr
        assert (table.scale, table.decimals, table.points_decimals()) == ("fraction", 2, 0)
        for row in table.rows:
            assert len(row.accuracy) == len(radii) and all(0 <= v <= 1 for v in row.accuracy) and row.acr is None
            assert list(row.accuracy) == sorted(row.accuracy, reverse=True)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["rows"][0]["accuracy"].pop(), "1 accuracies|5 accuracies for 6 radii"),
    (lambda d: d["rows"][0]["accuracy"].__setitem__(0, 59.0), "must lie in"),
    (lambda d: d["rows"][0]["accuracy"].__setitem__(0, 0.591), "at most 2 decimals"),
    (lambda d: d["rows"][0].__setitem__("acr", 0.5), "ACR"),
    (lambda d: d.__setitem__("radii", [0.5, 0.25, 0.75, 1.0, 1.25, 1.5]), "radii must increase"),
    (lambda d: d["rows"][1].__setitem__("sigma", 0.12), "twice"),
    (lambda d: d["rows"][0].__setitem__("sigma", -1), "not a noise level"),
    (lambda d: d.pop("source"), "needs the fields"),
])
def test_check_table_refuses_an_inconsistent_table(tmp_path, change, message):
    data = json.loads((published.TABLES / "cohen2019_cifar10.json").read_text())
    change(data)
    path = tmp_path / "cohen2019_cifar10.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=message):
        published.load_tables(tmp_path)


def test_cohen_tables_are_the_shipped_logs_rounded(cohen_logs):
    """Every published number is Cohen et al.'s own log (noise_s/test/sigma_s) written to 2 decimals."""
    tables = _tables()
    for name, layout in (("cohen2019_cifar10", CIFAR), ("cohen2019_imagenet", IMAGENET)):
        table = tables[name]
        for row in table.rows:
            df = analysis.read_log(cohen_logs / layout.format(f"{row.sigma:.2f}"))
            ours = [table.rounded(a) for a in analysis.certified_accuracy(df, table.radii)]
            assert ours == [table.fraction(v) for v in row.accuracy], (name, row.sigma)


def test_compare_prints_cohens_rows_beside_the_shipped_logs_with_zero_differences(cohen_logs, capsys):
    same = [cohen_logs / CIFAR.format(s) for s in ("0.12", "0.25", "0.50", "1.00")]
    same += [cohen_logs / IMAGENET.format(s) for s in ("0.25", "0.50", "1.00")]
    other = cohen_logs / "certify/cifar10/resnet110/noise_1.00/test/sigma_0.50"  # trained at 1.00, certified at 0.50
    table = analyze.main([*map(str, same), str(other), "--compare", "paper"])
    out = capsys.readouterr().out
    comparison = table.attrs["comparison"]
    logs = list(dict.fromkeys(comparison.index.get_level_values("log")))
    assert len(logs) == 8
    for log in logs:
        sources = [s for lg, s in comparison.index if lg == log]
        assert sources[0] == analysis.YOURS and sources[1].startswith("Cohen et al. (2019), σ=")
        delta = comparison.loc[(log, sources[2])].drop("ACR").dropna()
        assert len(delta) == 6
        assert (delta == 0).all() if "noise_1.00/sigma_0.50" not in log else (delta != 0).any()  # labels: no /test/
    assert "Cohen et al. (2019), σ=0.50 [cohen2019_cifar10]" in out and "Δ cohen2019_imagenet" in out
    lines = out.splitlines()
    row = lines[next(i for i, line in enumerate(lines) if "cifar10/resnet110/noise_0.50/sigma_0.50" in line
                     and "yours" in line) + 2]
    assert row.split()[2:8] == ["+0.0"] * 6


def _digits_log(cohen_logs: Path, tmp_path: Path) -> Path:
    log = tmp_path / "digits_ft_cadis.tsv"
    log.write_text((cohen_logs / CIFAR.format("0.25")).read_text())
    log.with_name(log.name + ".json").write_text(json.dumps({"config": {"dataset": "digits", "sigma": 0.25}}))
    return log


def test_compare_on_digits_logs_prints_them_alone_with_a_note(cohen_logs, tmp_path, capsys):
    log = _digits_log(cohen_logs, tmp_path)
    table = analyze.main([str(log), "--compare", "paper"])
    captured = capsys.readouterr()
    assert "comparison" not in table.attrs and "Beside the published" not in captured.out
    assert captured.out.splitlines()[3].endswith("500") and len(captured.out.splitlines()) == 4
    assert "note: --compare paper: no published rows for digits" in captured.err


def test_compare_in_the_paper_style_latex(cohen_logs, tmp_path):
    paths = [cohen_logs / CIFAR.format(s) for s in ("0.25", "0.50")]
    out = tmp_path / "t.tex"
    analyze.main([*map(str, paths), "--labels", "ours", "ours", "--style", "paper", "--format", "latex",
                  "--compare", "cifar10", "--out", str(out)])
    body = [line.rstrip(" \\").split(" & ") for line in out.read_text().splitlines() if line.count(" & ") == 8][1:]
    assert [r[:2] for r in body] == [["0.25", "ours"], ["", "Cohen et al. (2019) (published)"],
                                     ["0.50", "ours"], ["", "Cohen et al. (2019) (published)"]]
    assert body[1][2:] == ["--", "60", "43", "27", "0", "0", "0"] and body[3][2:] == ["--", "55", "41", "32", "23",
                                                                                      "15", "9"]
    assert body[0][3] == r"\textbf{60.0}" and body[2][2] == r"\textbf{0.538}"  # bold among our logs only
    assert "tables/cohen2019_cifar10.json" in out.read_text().splitlines()[0]  # a comment line: not escaped


def test_compare_plot_draws_the_published_points(cohen_logs, tmp_path, monkeypatch):
    drawn = {}
    plot = analyze.plot_curves

    def spy(*args, **kwargs):
        drawn["figure"] = plot(*args, **kwargs)

    monkeypatch.setattr(analyze, "plot_curves", spy)
    out = tmp_path / "c.png"
    analyze.main([str(cohen_logs / CIFAR.format("0.50")), "--compare", "paper", "--plot", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = drawn["figure"].axes[0]
    curve, points = ax.lines[0], next(line for line in ax.lines if "published" in line.get_label())
    assert points.get_label() == "Cohen et al. (2019) σ=0.5 (published)" and points.get_marker() == "o"
    assert list(points.get_xdata()) == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert list(points.get_ydata()) == [0.55, 0.41, 0.32, 0.23, 0.15, 0.09]
    assert points.get_color() == curve.get_color()


def test_compare_csv_names_datasets_and_refuses_bad_input(cohen_logs, tmp_path, capsys, cli_error):
    log = tmp_path / "ours.tsv"  # no sidecar, no dataset or sigma in its path
    log.write_text((cohen_logs / CIFAR.format("0.50")).read_text())
    analyze.main([str(log), "--compare", "paper"])
    assert "no dataset known" in capsys.readouterr().err
    analyze.main([str(log), "--compare", "cifar10", "--sigmas", "0.5", "--format", "csv"])
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "log,source,0.25,0.50,0.75,1.00,1.25,1.50,ACR" and len(rows) == 4
    assert rows[3].endswith("ours.tsv,Δ cohen2019_cifar10,0,0,0,0,0,0,")
    analyze.main([str(log), "--compare", "cohen2019_imagenet", "--sigmas", "0.75"])
    err = capsys.readouterr().err
    assert "no published rows for imagenet at sigma 0.75 (the tables have sigma 0.25, 0.5, 1)" in err
    line = cli_error(analyze.main, [log, "--compare", "cifar100"])
    assert re.search(r"--compare cifar100: choose paper .*cifar10, imagenet, digits.*cohen2019_cifar10", line)
    assert "--high-prob" in cli_error(analyze.main, [log, "--compare", "paper", "--high-prob", "0.001", "0.001"])


def test_compare_a_sequential_log_shows_its_acr_as_a_bound(cohen_logs, tmp_path, capsys):
    log = tmp_path / "cifar10" / "seq.tsv"
    log.parent.mkdir()
    log.write_text((cohen_logs / CIFAR.format("0.50")).read_text())
    log.with_name("seq.tsv.json").write_text(json.dumps({"config": {"sigma": 0.5, "mode": "sequential"}}))
    analyze.main([str(log), "--compare", "paper", "--format", "markdown"])
    out = capsys.readouterr().out
    yours = next(line for line in out.splitlines() if "| yours |" in line)
    assert yours.rstrip(" |").endswith(f"≥{analysis.acr(analysis.read_log(log)):.3f}") and "lower bound" in out
