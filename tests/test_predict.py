"""predict.py (Cohen et al.'s PREDICT) on the embedded digits models: the log equals Smooth.predict called directly
with the same seeds, under torchrun with 2 processes too, and sharded runs merge into it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import predict
from runkit.devices import torch_threads
from runkit.logs import PREDICT_HEADER

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
# sigma 1.5 and few samples at a loose alpha: predictions and abstentions depend on the exact noise of each image
BASE = ["--dataset", "digits", "--sigma", "1.5", "--N", "12", "--alpha", "0.3", "--max_images", "8", "--skip", "9",
        "--seed", "7", "--batch_size", "10", "--device", "cpu", "--precision", "fp32", "--no_progress",
        "--classifier_ckpt", str(MODELS / "digits_vit_tiny.pt"), "--denoiser_ckpt", str(MODELS / "digits_denoiser.pt")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def _body(path: Path) -> list[list[str]]:
    """The log without the time column."""
    lines = Path(path).read_text().split("\n")
    assert lines[0] == PREDICT_HEADER and lines[-1] == ""
    return [line.split("\t")[:4] for line in lines[1:-1]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict") / "ref.tsv"
    rows = predict.main([*BASE, "--outfile", str(out)])
    assert [r.idx for r in rows] == [9 * i for i in range(8)]
    return out


def test_log_equals_smooth_predict(reference):
    from certification import build_base_classifier
    from core import Smooth, image_generator
    from datasets import get_dataset

    model = build_base_classifier("digits", "digits_vit_tiny", str(MODELS / "digits_vit_tiny.pt"),
                                  str(MODELS / "digits_denoiser.pt"), 1.5, 10, torch.device("cpu"))
    smooth = Smooth(model, 10, 1.5)
    data = get_dataset("digits", "test")
    expected = []
    for i in range(0, 72, 9):
        prediction = smooth.predict(data[i][0], 12, 0.3, 10, generator=image_generator(7, i))
        expected.append([str(i), str(data[i][1]), str(prediction), str(int(prediction == data[i][1]))])
    assert _body(reference) == expected
    assert len({row[2] for row in expected}) >= 3 and any(row[2] == "-1" for row in expected)  # can fail


@pytest.mark.slow
def test_two_processes_equal_one(reference, tmp_path):
    out = tmp_path / "log.tsv"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "predict.py"), *BASE, "--batch_size", "7", "--outfile", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _body(out) == _body(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.tsv", "log.tsv.json"]


def test_shards_merge_into_the_one_process_log(reference, tmp_path):
    out = tmp_path / "log.tsv"
    for k in range(2):
        predict.main([*BASE, "--outfile", str(out), "--shard", f"{k}/2"])
    assert [row[0] for row in _body(tmp_path / "log.tsv.shard1of2")] == ["9", "27", "45", "63"]
    predict.main(["--merge", str(out)])
    assert _body(out) == _body(reference)
