"""train.py stopped every way a run stops and resumed equals the run that was not stopped: the same optimizer steps
(step log rows), weights, optimizer and loss-scaler state, bit for bit (CPU), with and without the test evaluation.

Stops: --max_steps (mid-epoch and at an epoch end), an epoch checkpoint, a --ckpt_every_steps checkpoint, SIGTERM
(mid-epoch and at an epoch end) and SIGINT during the epoch's test evaluation; fp32 and fp16 autocast with loss
scaling (a GradScaler on the CPU), the latter with --max_steps."""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from test_train import _args, tiny_models  # noqa: F401 - the fixture
from torch.utils.data import Subset

import train
import training

STEPS_PER_EPOCH = 4  # 48 training images / batch 8 = 6 batches = 12 micro-steps (M = 2) = 4 steps of 3
EPOCHS = 3


@pytest.fixture(autouse=True)
def _python_signal_defaults():
    """The handlers a foreground Python starts with, whatever this suite inherited: a background job (``nohup``, ``&``
    in a script) starts with SIGINT ignored, and Python then installs no KeyboardInterrupt handler."""
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGINT, saved[0])
    signal.signal(signal.SIGTERM, saved[1])


@pytest.fixture(scope="module")
def short_epochs():
    """Epochs of 48 training images, so that a few optimizer steps cross epoch ends."""
    import datasets

    real = datasets.get_dataset

    def first_images(name, split, **kwargs):
        dataset = real(name, split, **kwargs)
        return Subset(dataset, range(48)) if split == "train" else dataset

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets, "get_dataset", first_images)
        yield


def _run(models: dict, out: Path, *extra: str) -> dict:
    return train.main(_args(models, out, "--epochs", str(EPOCHS), "--no_tensorboard", "--num-steps", "1", *extra))


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _rows(path: Path, drop: int = 0) -> list[list[str]]:
    return [line.split("\t")[:len(line.split("\t")) - drop] for line in path.read_text().splitlines()]


def _assert_same_run(ref: Path, out: Path, with_test: bool = True) -> None:
    """The last checkpoints hold the same step, weights, optimizer and scaler state; the logs are equal (but the
    time column, and test_acc where ``out`` ran without evaluations)."""
    a, b = _load(ref / f"checkpoint-{EPOCHS}.pth.tar"), _load(out / f"checkpoint-{EPOCHS}.pth.tar")
    assert (a["epoch"], a["step"], a["micro"]) == (b["epoch"], b["step"], b["micro"]) == (EPOCHS, 12, 0)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k, state in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][k][name]) for name, v in state.items())
    assert a["scaler"] == b["scaler"]
    assert (ref / "log_steps.txt").read_text() == (out / "log_steps.txt").read_text()
    assert _rows(ref / "log.txt", 1 if with_test else 2) == _rows(out / "log.txt", 1 if with_test else 2)
    assert len(_rows(ref / "log.txt")) == EPOCHS + 1


@pytest.fixture(scope="module")
def reference(tiny_models, short_epochs, tmp_path_factory):  # noqa: F811
    """The uninterrupted run (made when first asked for)."""
    made: list = []

    def get() -> Path:
        if not made:
            made.append(tmp_path_factory.mktemp("ref") / "run")
            _run(tiny_models, made[0])
        return made[0]
    return get


def test_max_steps_then_resume_equals_the_uninterrupted_run(tiny_models, reference, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    _run(tiny_models, out, "--max_steps", "2")  # mid-epoch, with the stop's evaluation
    _run(tiny_models, out, "--resume", "auto")
    _assert_same_run(reference(), out)


def test_fp16_loss_scaling_on_the_cpu_resumes_exactly(tiny_models, short_epochs, tmp_path):  # noqa: F811
    """fp16 autocast with a GradScaler, on the CPU: a run stopped by --max_steps and resumed equals one that was not
    (weights, optimizer and the scaler's scale and growth tracker)."""
    fp16 = ("--precision", "fp16", "--accum_iter", "1", "--no_test")
    ref, out = tmp_path / "ref", tmp_path / "run"
    _run(tiny_models, ref, *fp16, "--max_steps", "3")
    _run(tiny_models, out, *fp16, "--max_steps", "1")
    _run(tiny_models, out, *fp16, "--max_steps", "3", "--resume", "auto")
    a, b = _load(ref / "checkpoint-step3.pth.tar"), _load(out / "checkpoint-step3.pth.tar")
    assert a["config"]["precision"] == "fp16" and a["scaler"]["scale"] > 0 and a["scaler"] == b["scaler"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    for k, state in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][k][name]) for name, v in state.items())
    assert (ref / "log_steps.txt").read_text() == (out / "log_steps.txt").read_text()


def test_no_test_run_equals_the_run_with_test_evaluations(tiny_models, reference, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    _run(tiny_models, out, "--no_test", "--max_steps", str(STEPS_PER_EPOCH))  # an epoch end, no evaluation
    _run(tiny_models, out, "--no_test", "--resume", "auto", "--log_every", "5")  # metrics read every 5th step
    ref_rows = {r[0]: r for r in _rows(reference() / "log_steps.txt")}
    rows = _rows(out / "log_steps.txt")
    assert [r[0] for r in rows[1:]] == ["1", "2", "3", "4", "5", "10"] and all(r == ref_rows[r[0]] for r in rows)
    (out / "log_steps.txt").write_text((reference() / "log_steps.txt").read_text())  # (compared above)
    _assert_same_run(reference(), out, with_test=False)


@pytest.mark.slow
def test_resumed_from_an_epoch_and_a_ckpt_every_steps_checkpoint(tiny_models, reference, tmp_path):  # noqa: F811
    every = tmp_path / "every"
    _run(tiny_models, every, "--ckpt_every_steps", "5")
    _assert_same_run(reference(), every)  # writing checkpoints changes nothing
    for name, later in (("checkpoint-step5.pth.tar", ["checkpoint-step10.pth.tar"]),
                        ("checkpoint-1.pth.tar", ["checkpoint-step5.pth.tar"])):
        out = tmp_path / name
        shutil.copytree(every, out)
        for other in [f"checkpoint-{EPOCHS}.pth.tar", *later]:
            (out / other).unlink()
        _run(tiny_models, out, "--resume", str(out / name))
        _assert_same_run(reference(), out)


def _signal_at(monkeypatch, sig: int, step: int = 0, evaluation: bool = False) -> None:
    """Send ``sig`` to this process after optimizer step ``step``, or during the first test evaluation."""
    sent = []

    def send() -> None:
        if not sent:
            sent.append(sig)
            os.kill(os.getpid(), sig)

    real_step, real_denoise = training.optimizer_step, training.noise_and_denoise

    def stepped(run):
        norm = real_step(run)
        if not evaluation and run.step == step:
            send()
        return norm

    def denoised(*args, generator=None, **kwargs):
        if evaluation and generator is not None:  # the evaluation's noise has its own generator
            send()
        return real_denoise(*args, generator=generator, **kwargs)

    monkeypatch.setattr(training, "optimizer_step", stepped)
    monkeypatch.setattr(training, "noise_and_denoise", denoised)


@pytest.mark.parametrize("sig, step, evaluation", [
    (signal.SIGTERM, 2, False),  # mid-epoch
    pytest.param(signal.SIGTERM, STEPS_PER_EPOCH, False, marks=pytest.mark.slow),  # the epoch's last step
    pytest.param(signal.SIGINT, 0, True, marks=pytest.mark.slow),  # during the epoch's test evaluation
])
def test_a_signal_stops_with_a_checkpoint_and_the_resume_is_exact(tiny_models, reference, tmp_path, monkeypatch,  # noqa: F811
                                                                  capsys, sig, step, evaluation):
    ref, out = reference(), tmp_path / "run"
    with monkeypatch.context() as patch:
        _signal_at(patch, sig, step, evaluation)
        with pytest.raises(SystemExit) as stopped:
            _run(tiny_models, out, "--resume", "auto")
    assert stopped.value.code == 128 + sig
    at = step or STEPS_PER_EPOCH
    ckpt = _load(out / f"checkpoint-step{at}.pth.tar")
    assert (ckpt["epoch"], ckpt["step"], ckpt["micro"]) == (0, at, 3 * at)  # the epoch's training done, not its row
    assert f"{signal.Signals(sig).name}: stopping after this optimizer step" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are restored
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not (out / "log.txt").exists() and len(_rows(out / "log_steps.txt")) == at + 1
    _run(tiny_models, out, "--resume", "auto")
    _assert_same_run(ref, out)


def test_a_second_signal_ends_at_once():
    from runkit.stops import StopRequest

    with StopRequest("stopping") as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested() and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_evaluation_does_not_touch_the_training_rng(tiny_models):  # noqa: F811
    from classifier import get_architecture
    from datasets import get_dataset
    from denoiser import load_denoiser

    test_set = Subset(get_dataset("digits", "test"), range(10))
    classifier = get_architecture("digits_vit_tiny", checkpoint=tiny_models["clf"])
    denoiser = load_denoiser("digits", tiny_models["den"])
    loader = torch.utils.data.DataLoader(test_set, batch_size=4, generator=torch.Generator().manual_seed(0))
    before = torch.get_rng_state()
    correct, total = training.evaluate(classifier, denoiser, loader, 0.25, denoiser.timestep_for_sigma(0.25),
                                       torch.device("cpu"), "fp32", seed=0)
    assert total == 10 and torch.equal(torch.get_rng_state(), before)
    with pytest.raises(ValueError, match="needs its own generator"):
        training.evaluate(classifier, denoiser, torch.utils.data.DataLoader(test_set), 0.25, 10, torch.device("cpu"),
                          "fp32", seed=0)


def test_augmentations_depend_on_the_image_and_epoch_only():
    from datasets import DigitsDataset

    items = training.SeededItems(DigitsDataset("train", augment=True), seed=0, epoch=1)
    before = torch.get_rng_state()
    first = [items[i][0] for i in (5, 9, 5)]
    assert torch.equal(first[0], first[2])  # the same shift each time image 5 is loaded in epoch 1
    assert torch.equal(torch.get_rng_state(), before)  # the training RNG untouched
    shifted = [not torch.equal(training.SeededItems(items.dataset, 0, e)[5][0], first[0]) for e in range(2, 12)]
    assert any(shifted)  # other epochs, other shifts


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_ranks_with_a_checkpoint(tiny_models, tmp_path):  # noqa: F811
    """A Slurm requeue's SIGTERM reaches torchrun, which forwards it to its workers: the two ranks agree on the step,
    write one checkpoint there and exit; the resumed 2-process run equals the uninterrupted one."""
    import subprocess
    import sys
    import time

    from test_train import REPO, _torchrun

    extra = ("--max_steps", "8", "--no_test", "--no_tensorboard", "--num-steps", "1")
    ref, out = tmp_path / "ref", tmp_path / "run"
    _torchrun(_args(tiny_models, ref, *extra))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "train.py", *_args(tiny_models, out, *extra)], cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not (
            (out / "log_steps.txt").exists() and len(_rows(out / "log_steps.txt")) >= 3):  # steps 1 and 2 done
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    stops = sorted(out.glob("checkpoint-step*.pth.tar"))
    assert len(stops) == 1 and "SIGTERM: stopping after this optimizer step" in output, output[-3000:]
    ckpt = _load(stops[0])
    assert 2 <= ckpt["step"] < 8 and len(ckpt["rng"]) == 2, output[-3000:]
    _torchrun(_args(tiny_models, out, *extra, "--resume", "auto"))
    a, b = _load(ref / "checkpoint-step8.pth.tar"), _load(out / "checkpoint-step8.pth.tar")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    for k, state in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][k][name]) for name, v in state.items())
    assert (ref / "log_steps.txt").read_text() == (out / "log_steps.txt").read_text()
