"""No host sync in the training step: each micro-step and optimizer step is counted for the operations that make the
host wait for the device (reading a value: item/bool/float/tolist, a size that depends on values: nonzero, boolean
masks, masked_select, unique; a tensor made from host data: lift_fresh). On the CPU by a dispatch mode that sees
every aten call; on CUDA by torch's own sync debug mode."""
from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from test_train import _args, tiny_models  # noqa: F401 - the fixture
from torch.utils._python_dispatch import TorchDispatchMode

import train
import training

SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::lift_fresh", "aten::unique2",
           "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive"}
STEPS = {name: getattr(training, name) for name in ("micro_step", "optimizer_step")}  # (unpatched)


class SyncCounter(TorchDispatchMode):
    """Counts the aten calls that wait for the device on CUDA (and ``Tensor.tolist``, which is not an aten call)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        indices = args[1] if name.startswith("aten::index") and len(args) > 1 else ()
        if name in SYNCING or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist, counter = torch.Tensor.tolist, self.calls

        def tolist(tensor):
            counter["Tensor.tolist"] += 1
            return self._tolist(tensor)
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def _counted_run(models: dict, out: Path, monkeypatch, *extra: str) -> dict[str, list[collections.Counter]]:
    """Train 2 optimizer steps of 3 micro-steps; the calls of each micro_step and optimizer_step."""
    counts: dict[str, list] = {"micro_step": [], "optimizer_step": [], "masked_in": []}
    for name in ("micro_step", "optimizer_step"):
        real = STEPS[name]

        def counted(*args, _real=real, _name=name, **kwargs):
            with SyncCounter() as counter:
                result = _real(*args, **kwargs)
            counts[_name].append(counter.calls)
            if _name == "micro_step":
                counts["masked_in"].append(float(result[-1]))
            return result
        monkeypatch.setattr(training, name, counted)
    train.main(_args(models, out, "--max_steps", "2", "--no_test", "--log_every", "2", "--num-steps", "2", *extra))
    return counts


def test_a_training_step_waits_for_the_device_once_for_the_masked_attack(tiny_models, tmp_path, monkeypatch):  # noqa: F811
    """The masked-only attack reads K (its batch size) on the host: one wait per micro-step that has masked-in images;
    the full attack and the optimizer step none. TensorBoard on: its gradient norm stays on the device too."""
    counts = _counted_run(tiny_models, tmp_path / "masked", monkeypatch)
    assert len(counts["micro_step"]) == 6 and any(m > 0 for m in counts["masked_in"])  # K > 0 happened
    for calls, masked_in in zip(counts["micro_step"], counts["masked_in"]):
        assert calls == {"aten::_local_scalar_dense": 1 if masked_in > 0 else 2}, calls  # (K = 0: None is checked)
    assert counts["optimizer_step"] == [collections.Counter()] * 2
    full = _counted_run(tiny_models, tmp_path / "full", monkeypatch, "--full_attack")
    assert full["micro_step"] == [collections.Counter()] * 6 and full["optimizer_step"] == [collections.Counter()] * 2


def test_the_counter_sees_what_waits():
    x, mask = torch.arange(4.0), torch.tensor([True, False, True, False])
    with SyncCounter() as counter:
        x[mask], bool(x.any()), x.sum().item(), x.tolist(), torch.tensor(1.0), x.nonzero()
        x.index_select(0, torch.nonzero_static(mask, size=2).squeeze(1)), x * mask  # these do not wait
    assert counter.calls == {"aten::index": 1, "aten::_local_scalar_dense": 2, "Tensor.tolist": 1,
                             "aten::lift_fresh": 1, "aten::nonzero": 1}


@pytest.mark.cuda
def test_no_synchronizing_call_in_a_cuda_micro_step(tiny_models, tmp_path, monkeypatch):  # noqa: F811
    """torch.cuda.set_sync_debug_mode flags every synchronizing CUDA call: none in the full attack's micro-step and
    in the optimizer step (fp16 with loss scaling: the scaler's inf check stays on the device), one (K) in the masked
    attack's."""
    import warnings

    flagged: dict[str, list[int]] = {"micro_step": [], "optimizer_step": []}
    for name in flagged:
        real = STEPS[name]

        def counted(*args, _real=real, _name=name, **kwargs):
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    result = _real(*args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            flagged[_name].append(sum("synchroniz" in str(w.message) for w in caught))
            return result
        monkeypatch.setattr(training, name, counted)
    args = _args(tiny_models, tmp_path / "run", "--max_steps", "2", "--no_test", "--log_every", "2")
    args[args.index("--device") + 1] = "cuda"
    args[args.index("--precision") + 1] = "fp16"
    train.main([*args, "--full_attack"])
    assert flagged["micro_step"] == [0] * 6 and flagged["optimizer_step"] == [0] * 2, flagged
    flagged = {"micro_step": [], "optimizer_step": []}
    train.main([*args[:args.index("--outdir") + 1], str(tmp_path / "masked"), *args[args.index("--outdir") + 2:]])
    assert all(n <= 2 for n in flagged["micro_step"]) and flagged["optimizer_step"] == [0] * 2, flagged
