"""The embedded demo: the shipped digits models load and perform as models/digits_metrics.json reports, and a
shortened demo (10 images, N = 40, 6 FT-CADIS steps) runs end to end through certify.py / train.py / analyze.py."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

import demo
from classifier import get_architecture
from datasets import get_dataset
from denoiser import load_denoiser
from runkit.errors import UserError

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"


def _test_split() -> tuple[torch.Tensor, torch.Tensor]:
    data = get_dataset("digits", "test")
    images, labels = zip(*(data[i] for i in range(len(data))))
    return torch.stack(images), torch.tensor(labels)


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((MODELS / "digits_metrics.json").read_text())


def test_shipped_classifier_accuracy_as_reported(metrics):
    classifier = get_architecture("digits_vit_tiny", checkpoint=MODELS / "digits_vit_tiny.pt").eval()
    x, y = _test_split()
    with torch.no_grad():
        acc = (classifier(x).argmax(1) == y).float().mean().item()
    assert len(y) == 360
    assert abs(acc - metrics["classifier"]["test_accuracy"]) <= 1 / 360 + 1e-9  # one image of slack (float ties)
    assert acc >= 0.9


def test_shipped_denoiser_loads_and_denoises(metrics):
    denoiser = load_denoiser("digits", MODELS / "digits_denoiser.pt", device="cpu")  # weights_only, strict
    assert sum(p.numel() for p in denoiser.unet.parameters()) == metrics["denoiser"]["parameters"]
    x, _ = _test_split()
    x = x[:120]
    sigma = 0.5
    noisy = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        denoised = denoiser.denoise(noisy, denoiser.timestep_for_sigma(sigma))
    psnr_noisy = -10 * math.log10(float((noisy - x).pow(2).mean()))
    psnr = -10 * math.log10(float((denoised - x).pow(2).mean()))
    reported = next(q for q in metrics["denoiser"]["test_quality"] if q["sigma"] == sigma)
    assert psnr > psnr_noisy + 8.0  # one-shot denoising removes most of the noise
    assert abs(psnr - reported["psnr_denoised"]) < 1.0  # a subset and other noise than the report, same quality


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    outdir = tmp_path / "demo"
    threads = torch.get_num_threads()
    summary = demo.main(["--quick", "--outdir", str(outdir), "--no_progress", "--threads", "1"])
    assert torch.get_num_threads() == threads  # restored
    for name in ("off_the_shelf.tsv", "ft_cadis.tsv", "table.md", "table.csv", "table.txt",
                 "certified_accuracy.png", "summary.json"):
        assert (outdir / name).is_file() and (outdir / name).stat().st_size > 0, name
    assert list((outdir / "ft_cadis").glob("checkpoint-*.pth.tar"))
    table = pd.read_csv(outdir / "table.csv", index_col=0)
    assert list(table.index) == [demo.OFF_THE_SHELF, demo.FT_CADIS]
    radii = ["0.00", "0.25", "0.50"]  # N = 40, alpha = 0.001: no radius exceeds 0.5 * Phi^-1(0.001^(1/40)) = 0.50007
    assert summary["radii"] == radii and summary["max_certifiable_radius"] == pytest.approx(0.5, abs=0.01)
    assert [c for c in table.columns if c[0].isdigit()] == radii and "ACR" in table.columns
    acc = table[radii].to_numpy()
    assert (acc[:, :-1] >= acc[:, 1:]).all()  # certified accuracy never grows with the radius
    assert (table["n"] == 10).all()
    for label in table.index:  # the table agrees with the certification log it came from
        log = pd.read_csv(outdir / ("off_the_shelf.tsv" if label == demo.OFF_THE_SHELF else "ft_cadis.tsv"), sep="\t")
        assert len(log) == 10
        correct = (log["predict"] == log["label"]).to_numpy()
        for r in radii:
            assert table.loc[label, r] == pytest.approx((correct & (log["radius"] >= float(r))).mean())
        assert table.loc[label, "ACR"] == pytest.approx((correct * log["radius"]).mean())
    assert json.loads((outdir / "summary.json").read_text())["table"] == summary["table"]
    sequential = summary["sequential"]  # the fine-tuned classifier again, with --sequential
    assert sequential["N"] == 40 and 0 < sequential["samples_per_image"] <= 40
    assert "samples/img" in (outdir / "table_sequential.txt").read_text()
    # both certifications used the same images
    assert (pd.read_csv(outdir / "off_the_shelf.tsv", sep="\t")["idx"].tolist()
            == pd.read_csv(outdir / "ft_cadis.tsv", sep="\t")["idx"].tolist())


def test_outdir_is_replaced_only_when_it_is_the_demos(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="not written by demo.py"):
        demo.prepare_outdir(foreign)
    assert (foreign / "mine.txt").read_text() == "keep"

    own = tmp_path / "own"
    demo.prepare_outdir(own)
    (own / "table.md").write_text("old")
    (own / "ft_cadis").mkdir()
    (own / "ft_cadis" / "log.txt").write_text("old")
    (own / "notes.txt").write_text("the user's")
    demo.prepare_outdir(own)
    assert "replacing the previous demo outputs" in capsys.readouterr().out
    assert not (own / "table.md").exists() and not (own / "ft_cadis").exists()
    assert (own / "notes.txt").read_text() == "the user's"


def test_bad_flags_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--denoiser_ckpt"):
        demo.main(["--quick", "--outdir", str(tmp_path / "o"), "--denoiser_ckpt", str(tmp_path / "missing.pt")])
    with pytest.raises(UserError, match="--N "):
        demo.main(["--quick", "--outdir", str(tmp_path / "o"), "--N", "0"])


@pytest.mark.parametrize("extra, message", [
    (["--alpha", "1.5"], r"--alpha 1.5: must be a finite number > 0 and < 1"),
    (["--alpha", "0"], r"--alpha 0.0: must be a finite number > 0 and < 1"),
    (["--alpha", "nan"], r"--alpha nan: must be a finite number > 0 and < 1"),
    (["--sigma", "nan"], r"--sigma nan: must be a finite number > 0"),
    (["--device", "meta"], r"--device meta: not a device this program runs on"),
    (["--outdir", "{file}/out"], r"--outdir .*file\.txt/out: .*file\.txt is a file, not a folder"),
])
def test_bad_values_are_one_line_errors_that_write_nothing(tmp_path, cli_error, files_of, extra, message):
    (tmp_path / "file.txt").write_text("keep")
    before = files_of(tmp_path)
    argv = ["--quick", "--outdir", str(tmp_path / "o")] + [e.format(file=tmp_path / "file.txt") for e in extra]
    assert re.search(message, cli_error(demo.main, argv))
    assert files_of(tmp_path) == before and not (tmp_path / "o").exists()


def test_a_demo_running_in_the_outdir_locks_it(tmp_path, cli_error, files_of, lock_held_elsewhere):
    from runkit.locks import lock_path
    out = tmp_path / "o"
    demo.prepare_outdir(out)
    (out / "table.md").write_text("the running demo's")
    with lock_held_elsewhere(lock_path(out, is_dir=True)) as proc:
        before = files_of(out)  # (including the holder's lock file)
        line = cli_error(demo.main, ["--quick", "--outdir", out])
    assert f"--outdir {out} is in use by pid {proc.pid}" in line
    assert files_of(out) == before
