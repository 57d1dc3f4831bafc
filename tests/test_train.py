"""train.py: schedules, a 2-process gloo run with an exact resume, bad input, a non-finite loss."""
from __future__ import annotations

import hashlib
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
import training
from runkit.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict:
    """Random digits denoiser and classifier (the classifier leans to class 0, so some images are masked in)."""
    from classifier import get_architecture
    from denoiser import build_denoiser

    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    torch.save(build_denoiser("digits").unet.state_dict(), folder / "den.pt")
    clf = get_architecture("digits_vit_tiny")
    with torch.no_grad():
        clf.model.head.bias[0] += 3.0
    torch.save(clf.model.state_dict(), folder / "clf.pt")
    bad = get_architecture("digits_vit_tiny", num_classes=5)  # does not fit a 10-class digits model
    torch.save(bad.model.state_dict(), folder / "clf5.pt")
    return {"den": str(folder / "den.pt"), "clf": str(folder / "clf.pt"), "clf5": str(folder / "clf5.pt")}


def _args(models: dict, outdir: Path, *extra: str) -> list[str]:
    return ["--dataset", "digits", "--denoiser_ckpt", models["den"], "--classifier_ckpt", models["clf"],
            "--device", "cpu", "--batch", "8", "--num_noises", "2", "--accum_iter", "3", "--workers", "0",
            "--log_every", "1", "--test_per_class", "2", "--train_noise_sd", "0.25", "--epochs", "2",
            "--warmup_epochs", "0.01", "--blr", "0.05", "--precision", "fp32", "--no_progress", "--outdir", str(outdir),
            *extra]


def _steps(path: Path) -> dict[int, list[str]]:
    rows = [ln.split("\t") for ln in path.read_text().splitlines()[1:] if ln.strip()]
    return {int(r[0]): r for r in rows}


# ------------------------------------------------------------------------------------------------ schedules, clipping
def test_lr_and_wd_schedules():
    assert training.lr_at(0.0, 1e-3, 1e-6, 3, 30) == 0.0
    assert training.lr_at(1.5, 1e-3, 1e-6, 3, 30) == pytest.approx(5e-4)  # linear warmup
    assert training.lr_at(3.0, 1e-3, 1e-6, 3, 30) == pytest.approx(1e-3)
    assert training.lr_at(16.5, 1e-3, 1e-6, 3, 30) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)  # half-way cosine
    assert training.lr_at(30.0, 1e-3, 1e-6, 3, 30) == pytest.approx(1e-6)
    assert training.cosine_at(0.0, 0.04, 0.4, 30) == pytest.approx(0.04)
    assert training.cosine_at(15.0, 0.04, 0.4, 30) == pytest.approx(0.22)
    assert training.cosine_at(30.0, 0.04, 0.4, 30) == pytest.approx(0.4)

    opt = torch.optim.AdamW([{"params": [torch.zeros(2, requires_grad=True)], "lr_scale": 0.5, "weight_decay": 0.1},
                             {"params": [torch.zeros(2, requires_grad=True)], "lr_scale": 1.0, "weight_decay": 0.0}])
    training.set_lr_wd(opt, 2e-3, 0.3)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 2e-3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]  # no-decay groups stay at 0


def test_per_parameter_gradient_clipping():
    a, b = torch.zeros(4, requires_grad=True), torch.zeros(2, requires_grad=True)
    a.grad = torch.tensor([2.0, 0.0, 0.0, 0.0])
    b.grad = torch.tensor([0.06, 0.08])
    training.clip_grad_per_param([a, b], 0.5)
    assert a.grad.norm().item() == pytest.approx(0.5, rel=1e-5)  # capped separately ...
    torch.testing.assert_close(b.grad, torch.tensor([0.06, 0.08]))  # ... the small one untouched


# ----------------------------------------------------------------------------------------------- 2 processes, resume
def _torchrun(args: list[str], launcher: tuple[str, ...] = ("torch.distributed.run", "--standalone")
              ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", *launcher, "--nproc_per_node", "2", "train.py", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_process_gloo_run_and_exact_resume(tiny_models, tmp_path):
    # 3 micro-steps per optimizer step, 2 per batch: step 1 ends in the middle of a batch
    first = tmp_path / "first"
    proc = _torchrun(_args(tiny_models, first, "--max_steps", "3", "--ckpt_every_steps", "1"))
    assert "2 process(es)" in proc.stdout
    for name in ("checkpoint-step1.pth.tar", "checkpoint-step2.pth.tar", "checkpoint-step3.pth.tar"):
        assert (first / name).is_file()
    assert not list(first.glob(".*.tmp"))  # atomic writes leave no temporary files
    log = (first / "log.txt").read_text().splitlines()
    assert log[0].split("\t")[:3] == ["epoch", "step", "lr"] and log[1].split("\t")[:2] == ["1", "3"]
    steps = _steps(first / "log_steps.txt")
    assert sorted(steps) == [1, 2, 3]
    assert any(float(r[5]) > 0 for r in steps.values())  # the masked adversarial loss was active

    ckpt = torch.load(first / "checkpoint-step1.pth.tar", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["micro"], ckpt["arch"]) == (0, 1, 3, "digits_vit_tiny")
    assert len(ckpt["rng"]) == 2 and ckpt["world_size"] == 2
    assert {"state_dict", "optimizer", "scaler", "args"} <= set(ckpt)

    # resume from the mid-batch checkpoint of step 1: the same losses and, at step 3, the same weights, bit for bit
    second = tmp_path / "second"
    _torchrun(_args(tiny_models, second, "--max_steps", "3", "--resume", str(first / "checkpoint-step1.pth.tar")))
    resumed = _steps(second / "log_steps.txt")
    assert sorted(resumed) == [2, 3]
    for s in (2, 3):
        assert resumed[s][3:6] == steps[s][3:6]  # loss, sce, madv as logged (8 significant digits)
    a = torch.load(first / "checkpoint-step3.pth.tar", map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(second / "checkpoint-step3.pth.tar", map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -------------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra, message", [
    (["--arch", "no_such_model_xyz"], "unknown architecture"),
    (["--batch", "7"], "not divisible by --num_noises"),
    (["--load_from", "/nonexistent/ckpt.pt"], "--load_from /nonexistent/ckpt.pt: file not found"),
    (["--resume", "/nonexistent/ckpt.pt"], "--resume /nonexistent/ckpt.pt: file not found"),
    (["--use_fp16", "true", "--precision", "bf16"], "contradicts"),
])
def test_bad_input_is_a_clear_error(tiny_models, tmp_path, extra, message):
    with pytest.raises(UserError, match=message.replace("/", ".").replace("-", ".")):
        train.main(_args(tiny_models, tmp_path / "run", *extra))


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_paper_launcher_torch_distributed_launch(tiny_models, tmp_path):
    """The paper's launch: python -m torch.distributed.launch (still in torch 2.x, deprecated) passes --local-rank=N
    to each process; train.py accepts it and takes the rank from the environment. The checkpoint records the input
    convention; block i's attention dropout follows --attn_drop_rate."""
    out = tmp_path / "run"
    launch = ("torch.distributed.launch", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()))
    proc = _torchrun(_args(tiny_models, out, "--max_steps", "1", "--no_test", "--no_tensorboard",
                           "--attn_drop_rate", "0.3", "--drop_path", "0", "--input_norm", "paper"), launcher=launch)
    assert "2 process(es)" in proc.stdout
    ckpt = torch.load(out / "checkpoint-step1.pth.tar", map_location="cpu", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["input_norm"] == "paper" and ckpt["args"]["local_rank"] in (0, 1)
    assert ckpt["args"]["attn_drop_rate"] == 0.3


def test_local_rank_flag_paper_resume_form_and_input_norm(tiny_models, tmp_path):
    """--local-rank / --local_rank parse (torch.distributed.launch's injection); --resume --load_from CKPT is
    --resume CKPT; the checkpoint records --input_norm and a resume with another one is refused."""
    for flag in ("--local-rank=0", "--local_rank=1"):
        cfg = training.config_from_args(train.build_parser().parse_args(["--dataset", "digits", flag]))
        assert cfg.local_rank in (0, 1)
    first = tmp_path / "first"
    train.main(_args(tiny_models, first, "--max_steps", "1", "--no_test", "--input_norm", "paper",
                     "--attn_drop_rate", "0.2"))
    ckpt = first / "checkpoint-step1.pth.tar"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["input_norm"] == "paper"
    result = train.main(_args(tiny_models, first, "--max_steps", "2", "--no_test", "--resume", "--load_from",
                              str(ckpt), "--attn_drop_rate", "0.2"))
    assert result["step"] == 2 and (first / "checkpoint-step2.pth.tar").is_file()
    assert result["classifier"].input_norm == "paper"
    assert [b.attn.attn_drop.p for b in result["classifier"].model.blocks][-1] == pytest.approx(0.2)
    with pytest.raises(UserError, match=r"--input_norm model \(the run: paper\) would change the run"):
        train.main(_args(tiny_models, first, "--max_steps", "3", "--resume", str(ckpt), "--input_norm", "model"))
    with pytest.raises(UserError, match="--resume needs a checkpoint"):
        train.main(_args(tiny_models, tmp_path / "x", "--resume"))
    # --load_from a checkpoint of the paper's code (state dict under classifier.): a new run from its weights
    clf = torch.load(tiny_models["clf"], weights_only=True)
    torch.save({"epoch": 1, "arch": "digits_vit_tiny", "state_dict": {"classifier." + k: v for k, v in clf.items()}},
               tmp_path / "paper.pth.tar")
    result = train.main(_args(tiny_models, tmp_path / "from_paper", "--max_steps", "1", "--no_test", "--load_from",
                              str(tmp_path / "paper.pth.tar"), "--blr", "0"))
    assert result["classifier"].input_norm == "paper"
    assert all(torch.equal(result["classifier"].model.state_dict()[k], v) for k, v in clf.items())  # lr 0: unchanged


def test_incompatible_load_from_and_non_checkpoint_resume(tiny_models, tmp_path):
    with pytest.raises(UserError, match=r"--load_from .*clf5.pt.*(shape|number of classes)"):
        train.main(_args(tiny_models, tmp_path / "a", "--load_from", tiny_models["clf5"]))
    with pytest.raises(UserError, match="not a train.py checkpoint"):
        train.main(_args(tiny_models, tmp_path / "b", "--resume", tiny_models["clf"]))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_models, tmp_path, monkeypatch, capsys):
    real = training.cadis_objective
    calls = {"n": 0}

    def flaky(*args, **kwargs):  # the 5th micro-step (in optimizer step 2) produces NaN
        calls["n"] += 1
        loss, sce, madv, correct = real(*args, **kwargs)
        return (loss * math.nan if calls["n"] == 5 else loss), sce, madv, correct

    monkeypatch.setattr(training, "cadis_objective", flaky)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        train.main(_args(tiny_models, out, "--max_steps", "4", "--ckpt_every_steps", "1"))
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "checkpoint-step1.pth.tar" in err
    assert sorted(p.name for p in out.glob("*.pth.tar")) == ["checkpoint-step1.pth.tar"]
    digest = hashlib.sha256((out / "checkpoint-step1.pth.tar").read_bytes()).hexdigest()
    ckpt = torch.load(out / "checkpoint-step1.pth.tar", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 1 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())

    # the good checkpoint resumes (and a fresh run refuses to overwrite the folder)
    monkeypatch.setattr(training, "cadis_objective", real)
    with pytest.raises(UserError, match="already holds a run"):
        train.main(_args(tiny_models, out, "--max_steps", "2"))
    result = train.main(_args(tiny_models, out, "--max_steps", "2", "--no_test",
                              "--resume", str(out / "checkpoint-step1.pth.tar")))
    assert result["step"] == 2 and (out / "checkpoint-step2.pth.tar").is_file()
    assert hashlib.sha256((out / "checkpoint-step1.pth.tar").read_bytes()).hexdigest() == digest


# ------------------------------------------------------------------------------------------------------ tensorboard
def _scalars(outdir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard's own reader loads the event files of ``outdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(outdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_scalars_match_the_text_logs_and_survive_a_resume(tiny_models, tmp_path):
    out = tmp_path / "run"
    train.main(_args(tiny_models, out, "--max_steps", "3", "--ckpt_every_steps", "1"))
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    scalars = _scalars(out)
    assert set(training.TB_STEP_TAGS) | {"test/acc"} <= set(scalars)
    steps = _steps(out / "log_steps.txt")
    for tag, col in (("train/lr", 2), ("train/loss", 3), ("train/sce", 4), ("train/madv", 5), ("train/acc", 6),
                     ("train/masked_in", 7)):
        assert [step for step, _ in scalars[tag]] == [1, 2, 3], tag
        for step, value in scalars[tag]:
            assert value == pytest.approx(float(steps[step][col]), rel=1e-5, abs=1e-7), tag
    assert any(value > 0 for _, value in scalars["train/madv"])
    epoch_row = (out / "log.txt").read_text().splitlines()[1].split("\t")
    assert scalars["test/acc"] == [(3, pytest.approx(float(epoch_row[9]), abs=1e-4))]
    assert scalars["train/weight_decay"][-1] == (3, pytest.approx(float(epoch_row[3]), rel=1e-5))
    for tag in ("train/grad_norm", "train/images_per_s"):
        assert [step for step, _ in scalars[tag]] == [1, 2, 3] and all(v > 0 for _, v in scalars[tag]), tag

    # resumed from step 1 into the same folder: steps 2 and 3 are written again, each step is shown once, and
    # (the resume being exact) with the same values
    train.main(_args(tiny_models, out, "--max_steps", "3", "--resume", str(out / "checkpoint-step1.pth.tar")))
    assert len(list(out.glob("events.out.tfevents.*"))) == 2
    again = _scalars(out)
    for tag in ("train/loss", "train/sce", "train/madv", "test/acc"):
        assert again[tag] == scalars[tag], tag


def test_no_tensorboard_writes_no_event_file(tiny_models, tmp_path):
    out = tmp_path / "run"
    train.main(_args(tiny_models, out, "--max_steps", "1", "--no_test", "--no_tensorboard"))
    assert (out / "checkpoint-step1.pth.tar").is_file() and not list(out.glob("*tfevents*"))


# --------------------------------------------------------------------------------------------------------- wrappers
@pytest.mark.parametrize("script, expected", [
    ("train_cifar10.sh", "--dataset cifar10 --arch cifar10_vit_base --ft_method full --epochs 30 --warmup_epochs 3 "
                         "--blr 1e-4 --batch 32 --accum_iter 4 --weight_decay 0.04 --weight_decay_end 0.4 "
                         "--layer_decay 0.65 --attn_drop_rate 0.2 --drop_path 0 --clip_grad 0.3 --train_noise_sd 0.5 "
                         "--test_noise_sd 0.5 "
                         "--num_noises 4 --lbd 4.0 --eps 64 --num-steps 4"),
    ("train_imagenet.sh", "--dataset imagenet --arch imagenet_vit_base --ft_method lora --epochs 10 --warmup_epochs 1 "
                          "--blr 4e-4 --batch 16 --accum_iter 4 --weight_decay 0.01 --weight_decay_end 0.1 "
                          "--layer_decay 0.9 --drop_path 0.0 --clip_grad 1.0 --train_noise_sd 0.5 --test_noise_sd 0.5 "
                          "--num_noises 2 --lbd 2.0 --eps 64 --num-steps 1"),
])
def test_paper_wrappers_build_the_torchrun_command(script, expected):
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": "python3"}
    env.pop("MASTER_PORT", None)
    run = subprocess.run(["bash", script, "--ngpus", "2", "--noise", "0.5", "--resume", "--load_from", "c.pt",
                          "--eps_double", "--warmup_eps", "5", "--outdir", "o"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    cmd = run.stdout.strip()
    assert "torch.distributed.run --standalone --nproc_per_node 2 train.py" in cmd
    assert expected in cmd
    assert cmd.endswith("--warm_start true --use_fp16 true --eps_double --warmup_eps 5 --resume c.pt --outdir o")
    env.update(NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="29511")
    run = subprocess.run(["bash", script, "--ngpus", "8", "--lbd", "1.5"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=30)
    assert ("--nnodes 2 --node_rank 1 --nproc_per_node 8 --master_addr 10.0.0.1 --master_port 29511 train.py"
            in run.stdout) and "--lbd 1.5" in run.stdout and "--resume" not in run.stdout
    bad = subprocess.run(["bash", script, "--noise"], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--noise needs a value" in bad.stderr


# -------------------------------------------------------------------------- reliability: validation, lock, resume
@pytest.mark.parametrize("extra, message", [
    (["--lr", "-1"], r"--lr -1.0: must be a finite number > 0"),
    (["--blr", "nan"], r"--blr nan: must be a finite number >= 0"),
    (["--eps", "nan"], r"--eps nan: must be a finite number >= 0"),
    (["--train_noise_sd", "nan"], r"--train_noise_sd nan: must be a finite number > 0"),
    (["--device", "meta"], r"--device meta: not a device this program runs on"),
    (["--outdir", "{file}/run"], r"--outdir .*file\.txt/run: .*file\.txt is a file, not a folder"),
    (["--override", "lr"], r"--override lr: only with --resume"),
    (["--resume", "auto", "--outdir", ""], r"--resume auto: needs --outdir"),
])
def test_bad_values_fail_before_work(tiny_models, tmp_path, cli_error, files_of, extra, message):
    (tmp_path / "file.txt").write_text("x")
    before = files_of(tmp_path)
    argv = _args(tiny_models, tmp_path / "run", *[e.format(file=tmp_path / "file.txt") for e in extra])
    while "" in argv:  # "--outdir ''": no --outdir at all
        i = argv.index("--outdir")
        argv = argv[:i] + argv[i + 2:]
    assert re.search(message, cli_error(train.main, argv))
    assert files_of(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_a_run_in_the_outdir_locks_it(tiny_models, tmp_path, cli_error, files_of, lock_held_elsewhere):
    from runkit.locks import lock_path
    out = tmp_path / "run"
    out.mkdir()
    (out / "log_steps.txt").write_text("the running job's\n")
    with lock_held_elsewhere(lock_path(out, is_dir=True)) as proc:
        before = files_of(out)
        for extra in ([], ["--resume", "auto"]):
            line = cli_error(train.main, _args(tiny_models, out, "--max_steps", "1", *extra))
            assert f"--outdir {out} is in use by pid {proc.pid}" in line
        assert files_of(out) == before


def _resume_args(ckpt, *extra) -> list[str]:
    """A requeue script's resume: only the checkpoint and where to run, the rest from the run."""
    return ["--dataset", "digits", "--resume", str(ckpt), "--device", "cpu", "--workers", "0", "--no_progress",
            "--no_test", *map(str, extra)]


def test_resume_takes_the_runs_configuration_and_refuses_changes(tiny_models, tmp_path, cli_error, files_of):
    out = tmp_path / "run"
    train.main(_args(tiny_models, out, "--max_steps", "2", "--ckpt_every_steps", "1", "--no_test",
                     "--train_noise_sd", "0.5", "--lbd", "2"))
    ckpt = out / "checkpoint-step2.pth.tar"
    recorded = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert recorded["config"]["train_noise_sd"] == 0.5 and recorded["config"]["precision"] == "fp32"
    assert set(recorded["fingerprints"]) == {"denoiser", "classifier_ckpt"}
    before = files_of(tmp_path)
    for extra, changed in ((["--train_noise_sd", "0.25"], "--train_noise_sd 0.25 (the run: 0.5)"),
                           (["--lbd", "1", "--seed", "3"], "--lbd 1.0 (the run: 2.0), --seed 3 (the run: 0)"),
                           (["--epochs", "1"], "--epochs 1 (the run: 2)"),
                           (["--precision", "bf16"], "--precision bf16 (the run: fp32)")):
        line = cli_error(train.main, _resume_args(ckpt, *extra))
        assert f"--resume {ckpt}: {changed} would change the run" in line and "--override" in line, line
    other_denoiser = tmp_path / "den.pt"  # another denoiser saved under the run's file name
    torch.manual_seed(5)
    from denoiser import build_denoiser
    torch.save(build_denoiser("digits").unet.state_dict(), other_denoiser)
    line = cli_error(train.main, _resume_args(ckpt, "--denoiser_ckpt", other_denoiser))
    assert f"--denoiser_ckpt {other_denoiser}: not the file the run of --resume {ckpt} was written with" in line
    assert files_of(tmp_path) == {**before, str(other_denoiser): other_denoiser.read_bytes()}
    # flags left out take the run's values (sigma 0.5, lambda 2, the denoiser file); --epochs may grow
    result = train.main(_resume_args(ckpt, "--max_steps", "3", "--epochs", "3"))
    config = torch.load(out / "checkpoint-step3.pth.tar", map_location="cpu", weights_only=True)["config"]
    assert result["step"] == 3 and (config["train_noise_sd"], config["lbd"], config["epochs"]) == (0.5, 2.0, 3)
    assert config["denoiser_ckpt"] == tiny_models["den"] and config["blr"] == 0.05
    # --override changes one on purpose
    train.main(_resume_args(out / "checkpoint-step3.pth.tar", "--max_steps", "4", "--train_noise_sd", "0.25",
                            "--lbd", "2", "--override", "train_noise_sd"))
    config = torch.load(out / "checkpoint-step4.pth.tar", map_location="cpu", weights_only=True)["config"]
    assert config["train_noise_sd"] == 0.25


def test_killed_before_the_first_checkpoint(tiny_models, tmp_path, cli_error, files_of):
    """Logs but no checkpoint (the run was killed before its first one): a new run is told that there is nothing to
    resume, never to --resume a file that does not exist; --resume auto starts over."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "log_steps.txt").write_text(training.STEP_LOG_HEADER + "\n1\t1\t0.001\t1.0\t1.0\t0\t0.5\t0.1\n2\t1")
    before = files_of(out)
    line = cli_error(train.main, _args(tiny_models, out, "--max_steps", "1"))
    assert "stopped before its first checkpoint, so there is nothing to resume" in line and ".pth.tar" not in line
    assert files_of(out) == before
    result = train.main(_args(tiny_models, out, "--max_steps", "1", "--resume", "auto", "--no_test"))
    assert result["step"] == 1 and list(_steps(out / "log_steps.txt")) == [1]
    line = cli_error(train.main, _args(tiny_models, out, "--max_steps", "2"))
    assert f"--resume {out / 'checkpoint-step1.pth.tar'} (its newest checkpoint; or --resume auto)" in line


def _train_process(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _newest_step(out: Path) -> int:
    return max([int(p.name[len("checkpoint-step"):-len(".pth.tar")]) for p in out.glob("checkpoint-step*.pth.tar")],
               default=0)


@pytest.mark.slow
def test_killed_at_random_points_and_resumed_gives_the_uninterrupted_run(tiny_models, tmp_path):
    """A requeued job's life: train.py --resume auto, killed (kill -9, SIGTERM) after a random number of new
    checkpoints (0: at a random moment of the start-up), resumed each time; the weights, the optimizer state and the
    logs at the end equal those of an uninterrupted run (the epoch row of log.txt averages every step of the epoch,
    not only those after the last resume). FT_CADIS_FAULT_SEED replays a sequence."""
    seed = int(os.environ.get("FT_CADIS_FAULT_SEED", random.randrange(2**31)))
    rng, trace = random.Random(seed), [f"FT_CADIS_FAULT_SEED={seed}"]
    # 3 kills, each after at most 2 new checkpoints (plus one written while the signal travels): 10 steps always
    # leave work for the last resume
    extra = ["--max_steps", "10", "--ckpt_every_steps", "1", "--no_test", "--num-steps", "1", "--no_tensorboard"]
    train.main(_args(tiny_models, tmp_path / "ref", *extra))
    out = tmp_path / "run"
    args = _args(tiny_models, out, *extra, "--resume", "auto")  # what a requeued job script runs every time
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        start = _newest_step(out)
        target = start + rng.randint(0, 2)
        proc = _train_process(args)
        # target == start: a random moment of the start-up, before the first new checkpoint
        deadline = time.monotonic() + (rng.uniform(0.0, 4.0) if target == start else 300)
        while _newest_step(out) < max(target, start + 1) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(sig)
        proc.wait(timeout=120)
        trace.append(f"{signal.Signals(sig).name} at step {target}: checkpoints up to {_newest_step(out)}")
    assert _newest_step(out) < 10, trace  # the last resume has work left
    train.main(args)
    ref, run = (torch.load(d / "checkpoint-step10.pth.tar", map_location="cpu", weights_only=True)
                for d in (tmp_path / "ref", out))
    assert all(torch.equal(ref["state_dict"][k], v) for k, v in run["state_dict"].items()), trace
    assert ref["optimizer"]["state"].keys() == run["optimizer"]["state"].keys()
    for k, state in ref["optimizer"]["state"].items():
        assert all(torch.equal(v, run["optimizer"]["state"][k][name]) for name, v in state.items()), trace
    assert (out / "log_steps.txt").read_text() == (tmp_path / "ref" / "log_steps.txt").read_text(), trace
    rows = [[line.split("\t")[:-1] for line in (d / "log.txt").read_text().splitlines()] for d in (tmp_path / "ref", out)]
    assert rows[0] == rows[1] and len(rows[0]) == 2, trace  # header and the (partial) epoch row, time aside
    assert not list(out.glob(".*.tmp")) and not (out / ".lock").exists()


def test_a_refused_pickle_is_named_without_unsafe_advice(tiny_models, tmp_path, cli_error, pickle_payload):
    payload, marker = pickle_payload
    evil = tmp_path / "checkpoint-1.pth.tar"
    torch.save({"state_dict": payload}, evil)
    for flag in ("--resume", "--load_from"):
        line = cli_error(train.main, _args(tiny_models, tmp_path / "run", flag, evil))
        assert f"{flag} {evil}: " in line and "refused: it holds pickled Python objects" in line, line
        assert "weights_only=False" not in line and "weights_only` set to `False" not in line
    assert not marker.exists()


def test_an_unwritable_outdir_is_an_error_before_training(tiny_models, tmp_path, cli_error, files_of, monkeypatch):
    """(As root every folder is writable, so the permission is denied by a stand-in for os.access.)"""
    from runkit import files
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    line = cli_error(train.main, _args(tiny_models, ro / "run", "--max_steps", "1"))
    assert f"--outdir {ro / 'run'}: cannot create files in {ro} (permission denied)" in line
    assert files_of(tmp_path) == {} and list(ro.iterdir()) == []


def test_gpu_settings_reach_the_run_and_tf32_is_recorded(tiny_models, tmp_path, monkeypatch, cli_error):
    """--dist_timeout reaches init_distributed, --tf32 and --cudnn_benchmark the one place that sets them; --tf32 is
    recorded in the checkpoint's configuration (a resume keeps it, changing it needs --override), with the device."""
    seen = []
    real_init, real_math = training.init_distributed, training.cuda_math
    monkeypatch.setattr(training, "init_distributed", lambda *a: seen.append(("init", *a)) or real_init(*a))
    monkeypatch.setattr(training, "cuda_math", lambda *a: seen.append(("math", *a)) or real_math(*a))
    out = tmp_path / "run"
    train.main(_args(tiny_models, out, "--max_steps", "1", "--no_test", "--no_tensorboard", "--dist_timeout", "30",
                     "--tf32", "off", "--cudnn_benchmark"))
    assert seen == [("init", "cpu", 30.0), ("math", "off", True)]
    ckpt = torch.load(out / "checkpoint-step1.pth.tar", map_location="cpu", weights_only=True)
    assert ckpt["config"]["tf32"] == "off" and ckpt["config"]["dist_timeout"] == 30.0
    from runkit.devices import device_model
    assert ckpt["device_model"] == device_model(torch.device("cpu"))
    seen.clear()
    train.main(_resume_args(out / "checkpoint-step1.pth.tar", "--max_steps", "2", "--no_tensorboard"))
    assert seen == [("init", "cpu", training.DEFAULT_DIST_TIMEOUT_MINUTES), ("math", "off", False)]
    line = cli_error(train.main, _resume_args(out / "checkpoint-step2.pth.tar", "--max_steps", "3", "--tf32", "on"))
    assert "--tf32 on (the run: off) would change the run" in line
    assert "--dist_timeout -1.0: must be a finite number > 0" in cli_error(
        train.main, _args(tiny_models, tmp_path / "x", "--dist_timeout", "-1"))
