"""Datasets: CIFAR-10, ImageNet and the embedded scikit-learn digits; items are ``(image [3, H, W] in [0, 1], label)``.

* ``cifar10``: torchvision CIFAR10 under ``data_dir`` / ``$CIFAR10_DIR`` / ``./data/cifar10``; downloads only when
  asked. train = RandomCrop(32, padding 4) + horizontal flip (the paper's), test = as is.
* ``imagenet``: ImageFolder ``train/`` and ``val/`` under ``data_dir`` / ``$IMAGENET_DIR`` / ``$IMAGENET_LOC_ENV`` (val
  in class folders). train = RandomResizedCrop(224) + flip, test = Resize(256) + CenterCrop(224). The paper's
  1,000-image certification subset is :func:`paper_imagenet_subset` (one random image per class);
  ``certification_indices(val, skip=50)`` is diffusion denoised smoothing's (every 50th image).
* ``digits``: ``sklearn.datasets.load_digits`` (1,797 8x8 images, values 0..16 -> /16), bilinearly upsampled to
  16x16, grey repeated to 3 channels; a fixed stratified split of 36 test images per class (1,437 train / 360 test).
"""
from __future__ import annotations

import functools
import os
import random
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms

from presets import DATASETS, DIGITS, PRESETS
from runkit.errors import UserError

SPLITS = ("train", "test")
# Environment variables naming a dataset's root, first found wins ($IMAGENET_LOC_ENV: Cohen's and the paper's code).
DATA_ENV = {"cifar10": ("CIFAR10_DIR",), "imagenet": ("IMAGENET_DIR", "IMAGENET_LOC_ENV")}
CIFAR10_DEFAULT_DIR = "./data/cifar10"
DIGITS_SIZE = DIGITS.image_size
DIGITS_TEST_PER_CLASS = 36
DIGITS_SPLIT_SEED = 0


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise UserError(f"--dataset {name!r}: unknown dataset; choose one of {', '.join(DATASETS)}")
    return name


def _check_split(split: str) -> str:
    split = "test" if split == "val" else split
    if split not in SPLITS:
        raise UserError(f"split {split!r}: choose train or test")
    return split


def get_num_classes(name: str) -> int:
    """Number of classes of dataset ``name``."""
    return PRESETS[_check_name(name)].num_classes


def dataset_image_size(name: str) -> int:
    """Side length of the images ``get_dataset(name, ...)`` returns (ImageNet: the 224 crop)."""
    return PRESETS[_check_name(name)].image_size


def get_dataset(
        name: str,
        split: str,
        data_dir: Optional[str | os.PathLike] = None,
        download: bool = False,
        augment: Optional[bool] = None,
) -> Dataset:
    """Dataset ``name`` (``cifar10``, ``imagenet``, ``digits``), split ``train`` or ``test`` (``val`` = ``test``).

    ``augment``: random training augmentation; ``None`` = the dataset's default (the paper's crops and flips for
    CIFAR-10 / ImageNet train, none for digits). The test split is never augmented.
    """
    split = _check_split(split)
    name = _check_name(name)
    if augment is None:
        augment = split == "train" and name != "digits"
    augment = augment and split == "train"
    if name == "cifar10":
        return _cifar10(split, data_dir, download, augment)
    if name == "imagenet":
        return _imagenet(split, data_dir, augment)
    return DigitsDataset(split, augment)


def _data_root(name: str, data_dir: Optional[str | os.PathLike], default: Optional[str]) -> Optional[Path]:
    root = data_dir or next((os.environ[v] for v in DATA_ENV[name] if os.environ.get(v)), None) or default
    return Path(root).expanduser() if root else None


def _cifar10(split: str, data_dir: Optional[str | os.PathLike], download: bool, augment: bool) -> Dataset:
    root = _data_root("cifar10", data_dir, CIFAR10_DEFAULT_DIR)
    if root.name == "cifar-10-batches-py":  # the extracted folder itself
        root = root.parent
    ops = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    transform = transforms.Compose(ops + [transforms.ToTensor()])
    try:
        return tv_datasets.CIFAR10(str(root), train=split == "train", download=download, transform=transform)
    except RuntimeError as err:
        if download:
            raise UserError(f"CIFAR-10: download to {root} failed ({err}); download cifar-10-python.tar.gz from "
                            "https://www.cs.toronto.edu/~kriz/cifar.html and extract it there") from None
        raise UserError(f"CIFAR-10 not found in {root} (expects {root}/cifar-10-batches-py); pass --data_dir or set "
                        f"$CIFAR10_DIR to the folder that holds it, or download it with "
                        f"`python -c \"import datasets; datasets.get_dataset('cifar10', 'test', download=True)\"`"
                        ) from None
    except OSError as err:
        raise UserError(f"CIFAR-10 in {root}: {err}") from None


def _imagenet(split: str, data_dir: Optional[str | os.PathLike], augment: bool) -> Dataset:
    root = _data_root("imagenet", data_dir, None)
    if root is None:
        raise UserError("ImageNet: pass --data_dir or set $IMAGENET_DIR (or $IMAGENET_LOC_ENV) to a folder with "
                        "train/ and val/ (class sub-folders, val prepared with valprep.sh)")
    folder = root / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise UserError(f"ImageNet: {folder} not found; --data_dir / $IMAGENET_DIR / $IMAGENET_LOC_ENV must hold "
                        "train/ and val/ with one sub-folder per class (val prepared with valprep.sh)")
    if augment:
        transform = transforms.Compose([
            transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    else:
        transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    try:
        return tv_datasets.ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, OSError) as err:
        raise UserError(f"ImageNet: {folder}: {err} (expects one sub-folder of images per class)") from None


def certification_indices(dataset: Dataset, skip: int = 1, max_images: Optional[int] = None) -> List[int]:
    """Indices of the images to certify: 0, skip, 2 skip, ... (Cohen's ``--skip``), at most ``max_images`` of them.

    With ImageNet's val set (sorted by class, 50 per class) ``skip=50`` gives diffusion denoised smoothing's 1,000
    images (the first of each class); the paper's are :func:`paper_imagenet_subset`. The indices are the dataset's
    own, so a log row names the image it certified.
    """
    if skip < 1:
        raise UserError(f"--skip {skip}: must be >= 1")
    if max_images is not None and max_images < 0:
        max_images = None
    indices = list(range(0, len(dataset), skip))
    return indices if max_images is None else indices[:max_images]


def paper_imagenet_subset(targets: Sequence[int], seed: int = 0, num_classes: int = 1000) -> List[int]:
    """The paper's ImageNet certification subset: one image per class, chosen at random.

    The rule of the paper's ``certify.py`` (``fix_random_seeds(seed)``, then ``sample_1_per_class_imagenet``):
    ``random.seed(seed)`` (Python's generator), then for each class c = 0 .. num_classes - 1 in order, the list of
    class c's dataset indices (in dataset order) is shuffled with ``random.shuffle`` and its first element kept
    (a class without images contributes nothing). Python's global generator is left as it was.

    Args:
        targets: the label of every image, in dataset order (``ImageFolder.targets``).
        seed: the paper's ``--seed`` (0 by default, as there).
        num_classes: the number of classes (1000 for ImageNet).

    Returns:
        The dataset indices, in class order.
    """
    by_class: List[List[int]] = [[] for _ in range(num_classes)]
    for i, label in enumerate(targets):
        if not 0 <= int(label) < num_classes:
            raise UserError(f"paper_imagenet_subset: label {label} of image {i} outside 0..{num_classes - 1}")
        by_class[int(label)].append(i)
    rng = random.Random(seed)  # same sequence as random.seed(seed) + random.shuffle on the global generator
    chosen = []
    for members in by_class:
        rng.shuffle(members)
        chosen.extend(members[:1])
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# The embedded digits data set
# ---------------------------------------------------------------------------------------------------------------


def digits_split(labels: Sequence[int], test_per_class: int = DIGITS_TEST_PER_CLASS,
                 seed: int = DIGITS_SPLIT_SEED) -> Tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split -> (train indices, test indices), both sorted: ``test_per_class`` per class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:test_per_class]
                           for c in np.unique(labels)])
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, np.sort(test)


@functools.lru_cache(maxsize=2)
def load_digits_images(size: int = DIGITS_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 scikit-learn digits as ([N, 3, size, size] float32 in [0, 1], [N] int64 labels). Cached: do not
    modify the returned tensors in place.

    8x8 values 0..16 -> /16, then bilinear upsampling (align_corners=False), clamped to [0, 1].
    """
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N, 1, 8, 8]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp_(0.0, 1.0).repeat(1, 3, 1, 1).contiguous(), torch.from_numpy(digits.target.astype(np.int64))


class DigitsDataset(Dataset):
    """One split of the embedded digits: ``images`` [n, 3, 16, 16], ``targets`` list, ``indices`` into load_digits.

    ``augment`` (train only, when asked): a random shift of up to one pixel (zero padding), no flips.
    """

    def __init__(self, split: str = "test", augment: bool = False) -> None:
        split = _check_split(split)
        images, labels = load_digits_images()
        train, test = digits_split(labels.tolist())
        self.split = split
        self.indices: List[int] = (train if split == "train" else test).tolist()
        self.images = images[self.indices]
        self.targets: List[int] = labels[self.indices].tolist()
        self.classes = [str(c) for c in range(10)]
        self.transform = transforms.RandomCrop(DIGITS_SIZE, padding=1) if augment else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        x = self.images[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[i]
