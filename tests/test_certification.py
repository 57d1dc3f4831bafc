"""certification.py: the run library is reusable for PREDICT (another per-image method, another row type)."""
from __future__ import annotations

import argparse

import pytest
import torch

import certification as C
from core import DenoisedClassifier, Smooth, image_generator
from logs import PREDICT_HEADER, PredictRow, read_rows
from utils import torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def _options(argv: list[str]) -> C.RunOptions:
    return C.resolve_options(C.RunOptions.from_namespace(C.add_run_arguments(argparse.ArgumentParser()).parse_args(
        argv)))


@pytest.mark.slow
def test_predict_run_equals_smooth_predict(tmp_path):
    from classifier import get_architecture
    from datasets import certification_indices, get_dataset

    torch.manual_seed(0)
    clf = get_architecture("digits_vit_tiny", num_classes=10)
    with torch.no_grad():  # spread the noisy predictions over several classes
        clf.model.patch_embed.proj.weight.mul_(5)
        clf.model.head.weight.mul_(5)
    torch.save(clf.model.state_dict(), tmp_path / "clf.pt")
    out = tmp_path / "predict.tsv"
    opts = _options(["--dataset", "digits", "--sigma", "0.25", "--N", "60", "--alpha", "0.1", "--max_images", "6",
                     "--seed", "5", "--batch_size", "16", "--device", "cpu", "--precision", "fp32", "--no_progress",
                     "--outfile", str(out),
                     "--classifier_ckpt", str(tmp_path / "clf.pt"), "--denoiser_ckpt", "none"])
    [rows] = C.run(opts, PredictRow, lambda smoothed, o: C.predict_method(smoothed, o.N, o.alpha, o.batch_size),
                   ["test"])
    assert out.read_text().split("\n")[0] == PREDICT_HEADER
    assert list(read_rows(out, PredictRow)[0]) == [r.idx for r in rows] == list(range(6))

    smooth = Smooth(DenoisedClassifier(None, clf.eval(), 0.25), 10, 0.25)
    data = get_dataset("digits", "test")
    expected = [smooth.predict(data[i][0], 60, 0.1, 16, generator=image_generator(5, i))
                for i in certification_indices(data, 1, 6)]
    assert [r.predict for r in rows] == expected
    assert [r.correct for r in rows] == [int(p == data[i][1]) for i, p in enumerate(expected)]
    assert len(set(expected)) >= 2  # not a constant classifier: the comparison can fail
