"""certification.py: the run library is reusable for PREDICT (another per-image method, another row type)."""
from __future__ import annotations

import argparse

import pytest
import torch

import certification as C
from core import DenoisedClassifier, Smooth, image_generator
from runkit.devices import torch_threads
from runkit.logs import PREDICT_HEADER, PredictRow, read_rows
from runkit.shards import Shard, decode_indices, encode_indices, parse_shard


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


def test_parse_shard_explicit_and_from_slurm():
    assert parse_shard("2/5") == Shard(2, 5) and str(Shard(2, 5)) == "2/5"
    assert Shard(1, 3).select(list(range(0, 20, 2))) == [2, 8, 14]
    slurm = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert parse_shard("auto", slurm) == Shard(3, 4)
    assert parse_shard("auto", {**slurm, "SLURM_ARRAY_TASK_MIN": "1"}) == Shard(2, 4)  # --array=1-4
    assert parse_shard("auto", {**slurm, "SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_STEP": "2"}) == Shard(3, 4)
    for text, environ, message in [("3/3", {}, "K must lie in 0..S-1"), ("1-3", {}, "expected K/S"),
                                   ("auto", {}, "SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT not set"),
                                   ("auto", {**slurm, "SLURM_ARRAY_TASK_ID": "7"}, "use --array=0-3")]:
        with pytest.raises(C.UserError, match=message):
            parse_shard(text, environ)


def test_shard_option_names_the_log(tmp_path):
    base = ["--dataset", "digits", "--sigma", "0.25", "--device", "cpu", "--outfile", str(tmp_path / "a.tsv")]
    assert _options(base).log_paths == [tmp_path / "a.tsv"]
    opts = _options([*base, "--shard", "1/4"])
    assert opts.log_paths == [tmp_path / "a.tsv.shard1of4"] and C.run_config(opts)["shard"] == "1/4"


def test_selection_encoding_round_trips():
    import random

    rng = random.Random(0)
    cases = [[], [5], [0, 3], list(range(0, 10000, 1)), list(range(0, 50000, 50)), [0, 3, 6, 9, 20, 25],
             sorted(rng.sample(range(50000), 1000)), [1, 2, 3, 10, 12, 14, 15]]
    for indices in cases:
        assert decode_indices(encode_indices(indices)) == indices
    assert encode_indices([0, 3, 6, 9, 20, 25]) == "0:12:3,20,25"
    assert encode_indices(list(range(0, 50000, 50))) == "0:50000:50"
