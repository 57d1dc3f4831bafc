"""The one checkpoint reader: every weights file (classifier, denoiser, train.py checkpoint) is read here.

* :func:`load`: ``torch.load(weights_only=True)`` (never a pickle of Python objects: such a file is refused, without
  torch's advice to retry with ``weights_only=False``), or safetensors by suffix; every failure is one line naming
  the flag and the file.
* :func:`state_dict_of`: the state dict inside what was loaded (a bare one, or under ``state_dict`` / ``model``).
* :func:`strip_prefix`: a prefix every key carries removed (``module.`` of DDP, the paper's ``classifier.``, a saved
  denoiser's ``unet.``); written once here.
* :func:`check_state_dict`: a strict match of keys and shapes against a model's, explained in one line.

What a state dict's keys mean (timm, Hugging Face, the paper's layouts) is decided by its users (``classifier.py``,
``denoiser.py``, ``training.py``).
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from runkit.errors import FileError, RunWarning, UserError
from runkit.files import check_regular_file, content_hash_path, recorded_content_hash, sha256_of

StateDict = dict[str, torch.Tensor]
DDP_PREFIX = "module."  # what DistributedDataParallel puts before every key of the model it wraps
WRAPPER_KEYS = ("state_dict", "model")  # where a checkpoint dict may hold the state dict


def load_error_message(err: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in one line. A file it refused because it holds pickled
    Python objects other than tensors is said to be refused, without torch's advice to retry with
    ``weights_only=False`` (which would run whatever code the file carries)."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) and "weights only" in text.lower():
        return ("refused: it holds pickled Python objects besides tensors, and loading those could run code from the "
                "file; use a checkpoint saved as a state dict of tensors, from a source you trust")
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text.strip() else type(err).__name__


def load(path: str | Path, flag: str, mmap: bool = False, verify: bool = True) -> Any:
    """The object saved in ``path`` (``torch.load(weights_only=True)`` on the CPU; a ``.safetensors`` file by
    safetensors), its bytes first checked against the SHA-256 recorded beside it (:func:`check_content_hash`).

    Args:
        path: the file.
        flag: what errors name (the command-line flag that gave the file, e.g. ``--classifier_ckpt``).
        mmap: memory-map the tensors (no copy in memory; files in the legacy non-zip format are read whole).
        verify: check the recorded content hash (False: a peek at a file that a verified load reads later).
    Raises:
        FileError: ``<flag> <path>: file not found``, ``... is a folder (a FIFO, ...), not a regular file``,
            ``... damaged ...`` or ``<flag> <path>: unreadable checkpoint (<why>)``.
    """
    path = Path(path).expanduser()
    if not check_regular_file(path, flag):
        raise FileError(path, "file not found", flag)
    if verify:
        check_content_hash(path, flag)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to parse the file is the user's file problem
        raise FileError(path, f"unreadable checkpoint ({load_error_message(err)})", flag) from None


def check_content_hash(path: Path, flag: str) -> None:
    """Refuse a file whose bytes differ from the SHA-256 recorded beside it (``<path>.sha256``, written by
    :func:`runkit.files.atomic_torch_save` with every checkpoint this project saves); warn (:class:`RunWarning`) when
    there is no record (a file from elsewhere), whose damage nothing could detect.

    Args:
        path: the file.
        flag: the flag that gave it (named by the error and the warning).
    """
    recorded = recorded_content_hash(path)
    record = content_hash_path(path).name
    if recorded is None:
        warnings.warn(f"{flag} {path}: no recorded content hash ({record} beside it, as train.py writes), so damaged "
                      "bytes in it would go unnoticed", RunWarning, stacklevel=3)
    elif sha256_of(path) != recorded:
        raise FileError(path, f"damaged: its bytes do not match the SHA-256 recorded in {record} (torch would load "
                        f"the damaged tensors); use an intact copy (or, for a file replaced on purpose, delete {record})",
                        flag)


def state_dict_of(obj: Any, path: str | Path, flag: str, expected: str = "a dict of tensors") -> StateDict:
    """The state dict in a loaded object: ``obj`` itself, or ``obj["state_dict"]`` / ``obj["model"]``.

    Args:
        obj: what :func:`load` returned.
        path, flag: what errors name.
        expected: what the error says was expected instead.
    Raises:
        FileError: ``<flag> <path>: not a state dict (found ...; expected <expected>)``.
    """
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        found = f"a {type(obj).__name__}" if not isinstance(obj, Mapping) else "a dict without tensors"
        raise FileError(Path(path).expanduser(), f"not a state dict (found {found}; expected {expected})", flag)
    return dict(obj)


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """``state_dict`` with ``prefix`` removed from every key, when every key carries it (else unchanged).

    Args:
        state_dict: the state dict.
        prefix: e.g. :data:`DDP_PREFIX`.
    """
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def read_state_dict(path: str | Path, flag: str, prefixes: Sequence[str] = (DDP_PREFIX,), mmap: bool = False,
                    expected: str = "a dict of tensors") -> tuple[StateDict, Any]:
    """(the state dict in ``path`` with ``prefixes`` stripped in turn, the whole loaded object).

    Args:
        path, flag, mmap: as :func:`load`.
        prefixes: prefixes to strip (:func:`strip_prefix`), in this order.
        expected: as :func:`state_dict_of`.
    """
    obj = load(path, flag, mmap=mmap)
    state_dict = state_dict_of(obj, path, flag, expected)
    for prefix in prefixes:
        state_dict = strip_prefix(state_dict, prefix)
    return state_dict, obj


def check_state_dict(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], source: str,
                     target: str, hint: str) -> None:
    """Refuse a state dict whose keys or shapes differ from a model's, in one line.

    Args:
        expected: the model's state dict.
        given: the checkpoint's.
        source: what errors start with (the flag and the file).
        target: what it was meant for (e.g. ``this architecture``, ``the 'cifar10' UNet``).
        hint: the likely cause, said at the end (e.g. ``wrong --arch?``).
    Raises:
        UserError: ``<source>: does not fit <target>: N missing keys (e.g. ...); M unexpected keys (e.g. ...);
            expected E entries, the file has G (<hint>)``, or ``... K tensors have the wrong shape (file vs model:
            key [given] vs [expected], ...) (<hint>)``.
    """
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if missing or unexpected:
        parts = [f"{len(keys)} {what} keys (e.g. {', '.join(keys[:3])})"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise UserError(f"{source}: does not fit {target}: {'; '.join(parts)}; expected {len(expected)} entries, "
                        f"the file has {len(given)} ({hint})")
    wrong = [f"{k} {list(given[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
             if tuple(given[k].shape) != tuple(v.shape)]
    if wrong:
        raise UserError(f"{source}: does not fit {target}: {len(wrong)} tensors have the wrong shape (file vs model: "
                        f"{', '.join(wrong[:3])}) ({hint})")
