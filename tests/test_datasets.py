"""datasets.py: the embedded digits split, missing-data errors, ImageNet transforms and the certification subset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets as D
from runkit.errors import UserError


def test_registry():
    assert D.DATASETS == ("cifar10", "imagenet", "digits")
    assert [D.get_num_classes(n) for n in D.DATASETS] == [10, 1000, 10]
    assert [D.dataset_image_size(n) for n in D.DATASETS] == [32, 224, 16]
    with pytest.raises(UserError, match="unknown dataset"):
        D.get_dataset("mnist", "test")
    with pytest.raises(UserError, match="split"):
        D.get_dataset("digits", "dev")


def test_digits_split_shapes_ranges_balance():
    train, test = D.get_dataset("digits", "train"), D.get_dataset("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    assert set(train.indices).isdisjoint(test.indices) and len(set(train.indices) | set(test.indices)) == 1797
    x, y = test[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # grey repeated
    assert 0.0 <= float(train.images.min()) and float(train.images.max()) <= 1.0
    assert float(train.images.max()) > 0.9  # real ink, not an all-dark image
    assert np.bincount(test.targets).tolist() == [36] * 10
    assert np.bincount(train.targets).min() >= 138


def test_digits_match_sklearn_and_are_deterministic():
    from sklearn.datasets import load_digits
    digits = load_digits()
    a, b = D.get_dataset("digits", "test"), D.get_dataset("digits", "test")
    assert a.indices == b.indices and torch.equal(a.images, b.images)
    assert a.indices == sorted(a.indices)
    assert a.targets == digits.target[a.indices].tolist()
    # the 16x16 image is the bilinear upsampling of the 8x8 original /16: block means are close to the original
    i = a.indices[0]
    small = torch.nn.functional.avg_pool2d(a.images[:1, :1], 2)[0, 0].numpy()
    assert np.abs(small - digits.images[i] / 16.0).max() < 0.3
    assert D.digits_split(digits.target)[1].tolist() == a.indices


def test_digits_augment_only_when_asked():
    plain = D.get_dataset("digits", "train")
    assert torch.equal(plain[3][0], plain.images[3])  # augment=False is the default
    torch.manual_seed(0)
    aug = D.get_dataset("digits", "train", augment=True)
    shifted = [not torch.equal(aug[i][0], aug.images[i]) for i in range(20)]
    assert any(shifted)
    assert D.get_dataset("digits", "test", augment=True).transform is None  # never on the test split


def test_cifar10_missing_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"CIFAR-10 not found in .*--data_dir"):
        D.get_dataset("cifar10", "test", data_dir=tmp_path)
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path / "env"))
    with pytest.raises(UserError, match="env"):
        D.get_dataset("cifar10", "train")


def test_imagenet_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGENET_DIR", raising=False)
    monkeypatch.delenv("IMAGENET_LOC_ENV", raising=False)
    with pytest.raises(UserError, match="IMAGENET_DIR"):
        D.get_dataset("imagenet", "test")
    with pytest.raises(UserError, match="val not found"):
        D.get_dataset("imagenet", "test", data_dir=tmp_path)
    (tmp_path / "val").mkdir()
    with pytest.raises(UserError, match="sub-folder"):
        D.get_dataset("imagenet", "test", data_dir=tmp_path)


@pytest.fixture()
def fake_imagenet(tmp_path: Path) -> Path:
    """3 classes x 4 PNGs of different sizes under train/ and val/."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, wnid in enumerate(("n01", "n02", "n03")):
            folder = tmp_path / split / wnid
            folder.mkdir(parents=True)
            for k in range(4):
                h, w = (300 + 10 * k, 260 + 20 * c)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{k}.png")
    return tmp_path


def test_imagenet_fake_folder(fake_imagenet, monkeypatch):
    val = D.get_dataset("imagenet", "test", data_dir=fake_imagenet)
    assert len(val) == 12
    x, y = val[5]
    assert x.shape == (3, 224, 224) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and y == 1
    assert torch.equal(val[5][0], x)  # the test transform is deterministic
    monkeypatch.setenv("IMAGENET_DIR", str(fake_imagenet))
    train = D.get_dataset("imagenet", "train")
    assert train[0][0].shape == (3, 224, 224)
    idx = D.certification_indices(val, skip=4)
    assert idx == [0, 4, 8] and [val.targets[i] for i in idx] == [0, 1, 2]  # one per class
    assert D.certification_indices(val, skip=4, max_images=2) == [0, 4]
    assert D.certification_indices(val, skip=1) == list(range(12))
    with pytest.raises(UserError, match="--skip"):
        D.certification_indices(val, skip=0)


def test_imagenet_root_from_imagenet_loc_env(fake_imagenet, monkeypatch):
    """$IMAGENET_LOC_ENV (Cohen's and the paper's variable) names the root when $IMAGENET_DIR is not set."""
    monkeypatch.delenv("IMAGENET_DIR", raising=False)
    monkeypatch.setenv("IMAGENET_LOC_ENV", str(fake_imagenet))
    assert len(D.get_dataset("imagenet", "test")) == 12
    monkeypatch.setenv("IMAGENET_DIR", str(fake_imagenet / "elsewhere"))  # $IMAGENET_DIR comes first
    with pytest.raises(UserError, match="elsewhere"):
        D.get_dataset("imagenet", "test")


def test_paper_imagenet_subset_reproduces_the_papers_rule():
    """Both cases of fixtures/upstream/imagenet_subset.json (outputs of the paper's code), exactly."""
    import json
    import random
    cases = json.loads((Path(__file__).parent / "fixtures" / "upstream" / "imagenet_subset.json").read_text())["cases"]
    assert len(cases) == 2
    state = random.getstate()
    for case in cases:
        targets = [c for c, count in enumerate(case["counts"]) for _ in range(count)]  # sorted by class
        chosen = D.paper_imagenet_subset(targets, case["seed"])
        assert chosen == case["indices"]
        assert len(chosen) == sum(1 for n in case["counts"] if n > 0)
        assert all(targets[i] == c for i, c in zip(chosen, sorted({targets[i] for i in chosen})))
    assert random.getstate() == state  # Python's global generator is left alone
    assert D.paper_imagenet_subset(targets, 1) != D.paper_imagenet_subset(targets, 2)
    assert D.paper_imagenet_subset([2, 0, 2, 0], 0, num_classes=3) in ([1, 0], [1, 2], [3, 0], [3, 2])
    with pytest.raises(UserError, match="label 7"):
        D.paper_imagenet_subset([0, 7], 0, num_classes=3)
