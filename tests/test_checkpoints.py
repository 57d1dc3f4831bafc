"""checkpoints.py: the one reader: weights_only loading, one-line errors naming flag and file, prefix stripping."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from runkit import checkpoints
from runkit.errors import UserError

SD = {"a.weight": torch.arange(4.0), "b.bias": torch.ones(2)}


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("mmap", [False, True])
def test_read_state_dict_unwraps_and_strips(tmp_path, mmap):
    for name, obj in (("bare", SD), ("wrapped", {"state_dict": {"module." + k: v for k, v in SD.items()},
                                                 "epoch": 3}),
                      ("model", {"model": {"module.unet." + k: v for k, v in SD.items()}})):
        torch.save(obj, tmp_path / f"{name}.pt")
        sd, loaded = checkpoints.read_state_dict(tmp_path / f"{name}.pt", "--x", ("module.", "unet."), mmap=mmap)
        assert sd.keys() == SD.keys() and all(torch.equal(sd[k], SD[k]) for k in SD), name
        assert isinstance(loaded, dict)
    from safetensors.torch import save_file
    save_file(SD, str(tmp_path / "w.safetensors"))
    assert checkpoints.read_state_dict(tmp_path / "w.safetensors", "--x")[0].keys() == SD.keys()


def test_strip_prefix_only_when_every_key_has_it():
    assert checkpoints.strip_prefix({"module.a": 1, "module.b": 2}, "module.") == {"a": 1, "b": 2}
    assert checkpoints.strip_prefix({"module.a": 1, "b": 2}, "module.") == {"module.a": 1, "b": 2}
    assert checkpoints.strip_prefix({}, "module.") == {}


def test_errors_name_flag_and_file(tmp_path):
    missing = tmp_path / "missing.pt"
    assert _error(checkpoints.load, missing, "--resume") == f"--resume {missing}: file not found"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert _error(checkpoints.load, garbage, "--denoiser_ckpt").startswith(
        f"--denoiser_ckpt {garbage}: unreadable checkpoint (")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    msg = _error(checkpoints.read_state_dict, tmp_path / "list.pt", "--classifier_ckpt")
    assert msg.startswith(f"--classifier_ckpt {tmp_path / 'list.pt'}: not a state dict (found a list")
    torch.save({"epoch": 3}, tmp_path / "no_tensors.pt")
    assert "found a dict without tensors" in _error(checkpoints.read_state_dict, tmp_path / "no_tensors.pt", "--x")


def test_a_pickle_is_refused_and_never_run(tmp_path, pickle_payload):
    payload, marker = pickle_payload
    for name, obj in (("evil.pt", {"w": payload}), ("module.pt", nn.Linear(2, 2))):
        torch.save(obj, tmp_path / name)
        for mmap in (False, True):
            msg = _error(checkpoints.load, tmp_path / name, "--finetuned_path", mmap=mmap)
            assert "refused: it holds pickled Python objects" in msg and "weights_only=False" not in msg
    assert not marker.exists()


def test_checkpoint_errors_carry_the_facts(tmp_path):
    """A refused file is a FileError: the path, what is wrong and the flag that named it, besides the message."""
    from runkit.errors import FileError

    missing = tmp_path / "none.pt"
    with pytest.raises(FileError) as err:
        checkpoints.load(missing, "--resume")
    assert (err.value.path, err.value.reason, err.value.source) == (missing, "file not found", "--resume")
    assert str(err.value) == f"--resume {missing}: file not found" and isinstance(err.value, UserError)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(FileError) as err:
        checkpoints.read_state_dict(tmp_path / "list.pt", "--load_from")
    assert err.value.source == "--load_from" and err.value.reason.startswith("not a state dict (found a list")
