"""Nothing lost, nothing mixed: a requeued finished run, conflicting or foreign rows, lock files and temporaries of
other outputs, files the user put beside ours, replaced or corrupted weights, a classifier gone NaN.

Runs on the digits dataset with the shipped small models (``models/``), few images and small N, on the CPU.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import bench
import certify
import demo
import train
import training
from runkit import checkpoints, files
from runkit.errors import UserError
from runkit.locks import lock_path, run_lock
from runkit.logs import HEADER, LogWarning

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
CLASSIFIER, DENOISER = MODELS / "digits_vit_tiny.pt", MODELS / "digits_denoiser.pt"
CERTIFY = ["--dataset", "digits", "--sigma", "0.25", "--N0", "10", "--N", "50", "--device", "cpu", "--no_progress",
           "--seed", "3", "--precision", "fp32", "--denoiser_ckpt", "none", "--batch_size", "64"]


def _certify(outfile: Path, *extra: str) -> list[str]:
    return CERTIFY + ["--classifier_ckpt", str(CLASSIFIER), "--outfile", str(outfile), *map(str, extra)]


def _rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()[1:]]


@pytest.fixture(scope="module")
def log12(tmp_path_factory) -> Path:
    """A finished 12-image certification log (with its sidecar) of the shipped classifier."""
    out = tmp_path_factory.mktemp("log12") / "log.tsv"
    certify.main(_certify(out, "--max_images", 12))
    return out


def _copy_log(log: Path, folder: Path) -> Path:
    out = folder / log.name
    shutil.copy(log, out)
    shutil.copy(log.with_name(log.name + ".json"), out.with_name(out.name + ".json"))
    return out


# ------------------------------------------------------------------------------------------ requeue of a finished run
TRAIN = ["--dataset", "digits", "--device", "cpu", "--batch", "8", "--num_noises", "2", "--accum_iter", "1",
         "--workers", "0", "--log_every", "1", "--test_per_class", "1", "--train_noise_sd", "0.25", "--epochs", "1",
         "--warmup_epochs", "0.01", "--precision", "fp32", "--no_progress", "--no_tensorboard",
         "--classifier_ckpt", str(CLASSIFIER), "--denoiser_ckpt", str(DENOISER)]


def test_requeue_of_a_finished_training_run_keeps_its_logs(tmp_path, capsys, files_of):
    """The same command again with --resume auto (a Slurm requeue) finds nothing to do and changes no file."""
    out = tmp_path / "run"
    argv = TRAIN + ["--outdir", str(out), "--max_steps", "2"]
    train.main(argv)
    assert len(_rows(out / "log.txt")) == 1 and len(_rows(out / "log_steps.txt")) == 2
    before = files_of(out)
    capsys.readouterr()
    result = train.main(argv + ["--resume", "auto"])
    assert "nothing to do" in capsys.readouterr().out and result["step"] == 2
    assert files_of(out) == before


# ------------------------------------------------------------------------------------- conflicting and foreign rows
def _with_extra_row(log: Path, folder: Path, row: list[str]) -> Path:
    out = _copy_log(log, folder)
    with open(out, "a") as f:
        f.write("\t".join(row) + "\n")
    return out


def test_resume_refuses_a_conflicting_duplicate_row(log12, tmp_path, cli_error, files_of):
    first = _rows(log12)[4]
    other = [first[0], first[1], first[2], repr(float(first[3]) + 0.5), first[4], first[5]]
    out = _with_extra_row(log12, tmp_path, other)
    before = files_of(tmp_path)
    line = cli_error(certify.main, _certify(out, "--max_images", 12, "--resume"))
    assert "idx 4" in line and str(out) in line, line
    assert files_of(tmp_path) == before


def test_resume_skips_an_identical_repeat_with_a_warning(log12, tmp_path):
    first = _rows(log12)[4]
    out = _with_extra_row(log12, tmp_path, first[:5] + ["9.9"])  # the same result, another time
    with pytest.warns(LogWarning, match=f"{out}: skipped 1 repeated row"):
        certify.main(_certify(out, "--max_images", 12, "--resume"))
    assert [r[:5] for r in _rows(out)] == [r[:5] for r in _rows(log12)]


def test_a_conflict_between_a_log_and_its_rank_part_is_refused(tmp_path):
    from runkit.parts import read_done

    out = tmp_path / "log.tsv"
    out.write_text(HEADER + "\n0\t3\t3\t0.5\t1\t0.1\n")
    part = tmp_path / "log.tsv.rank1"
    part.write_text(HEADER + "\n0\t3\t3\t0.5\t1\t0.2\n")  # the same result: kept once
    with pytest.warns(LogWarning, match="repeated"):
        assert list(read_done(out)) == [0]
    part.write_text(HEADER + "\n0\t3\t-1\t0.0\t0\t0.2\n")
    with pytest.raises(UserError, match=f"{out} and {part} both hold idx 0 with different results"):
        read_done(out)


def test_merge_refuses_a_conflicting_duplicate_row_in_a_shard(tmp_path, cli_error):
    out = tmp_path / "log.tsv"
    for k in range(2):
        certify.main(_certify(out, "--max_images", 4, "--shard", f"{k}/2"))
    shard = tmp_path / "log.tsv.shard1of2"
    first = _rows(shard)[0]
    with open(shard, "a") as f:
        f.write("\t".join([first[0], first[1], str((int(first[2]) + 1) % 10), "0.0", "0", "0.1"]) + "\n")
    line = cli_error(certify.main, ["--merge", out])
    assert f"idx {first[0]}" in line, line
    assert not out.exists()


@pytest.mark.parametrize("idx", ["300", "9999"])  # in the dataset but not selected; not in the dataset
def test_resume_refuses_a_row_outside_the_selection(log12, tmp_path, cli_error, files_of, idx):
    out = _with_extra_row(log12, tmp_path, [idx, "3", "3", "0.1", "1", "0.1"])
    before = files_of(tmp_path)
    line = cli_error(certify.main, _certify(out, "--max_images", 12, "--resume"))
    assert f"idx {idx}" in line, line
    assert files_of(tmp_path) == before


def test_resume_with_a_smaller_max_images_is_refused(log12, tmp_path, cli_error, files_of):
    """The log holds 12 images, --max_images 6 selects 6: refused (the message and the summary would disagree);
    the same or a larger --max_images continues it."""
    out = _copy_log(log12, tmp_path)
    before = files_of(tmp_path)
    line = cli_error(certify.main, _certify(out, "--max_images", 6, "--resume"))
    assert "--max_images 6" in line and "12" in line, line
    assert files_of(tmp_path) == before
    rows = certify.main(_certify(out, "--max_images", 13, "--resume"))
    assert len(rows) == 13


# ------------------------------------------------------------------------------------ lock files, temporary files
@pytest.mark.parametrize("dangling", [False, True])
def test_a_lock_file_that_is_a_symlink_is_refused(tmp_path, dangling):
    victim = tmp_path / "precious.txt"
    if not dangling:
        victim.write_text("mine\n")
    lock = lock_path(tmp_path / "a.tsv")
    lock.symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link"):
        with run_lock(lock, "--outfile a.tsv"):
            pass
    assert (victim.read_text() == "mine\n") if not dangling else not victim.exists()
    assert lock.is_symlink()


def test_start_up_cleanup_removes_only_this_outputs_temporaries(tmp_path):
    out = tmp_path / "a.tsv"
    others = [tmp_path / name for name in (".a.tsv2.abcd1234.tmp", ".a.tsv_backup.k3j4h5g6.tmp",
                                           ".a.tsv.x.tmp", ".a.tsv.abcd12345.tmp")]
    ours = [tmp_path / name for name in (".a.tsv.x1y2z3w4.tmp", ".a.tsv.json.q1w_e3r4.tmp")]
    for p in others + ours:
        p.write_text("x")
    certify.main(_certify(out, "--max_images", 1))
    assert [p.exists() for p in others] == [True] * len(others)
    assert [p.exists() for p in ours] == [False] * len(ours)


def test_the_temporary_name_pattern_is_the_one_atomic_writes_use(tmp_path):
    """What :func:`runkit.files.remove_stale_temporary_files` matches is what an atomic write leaves when killed."""
    target = tmp_path / "a.tsv"
    with files._atomic_file(target, "w") as f:
        f.write("x")
        left = list(tmp_path.iterdir())
    assert len(left) == 1 and target.read_text() == "x"
    left[0].write_text("x")  # what a writer killed at that moment leaves
    assert files.remove_stale_temporary_files(tmp_path, ["a.tsv"]) == left
    assert list(tmp_path.iterdir()) == [target]


# --------------------------------------------------------------------------------- files the user put beside ours
def test_demo_rerun_keeps_a_users_file_in_its_training_folder(tmp_path):
    outdir = tmp_path / "D"
    (outdir / "ft_cadis").mkdir(parents=True)
    (outdir / demo.MARKER).write_text("written by demo.py\n")
    for name in ("checkpoint-1.pth.tar", "checkpoint-step6.pth.tar", "checkpoint-step6.pth.tar.sha256", "log.txt",
                 "log_steps.txt", "events.out.tfevents.1.host.1.0", "ft_cadis.tsv"):
        (outdir / "ft_cadis" / name).write_text("demo\n")
    (outdir / "ft_cadis.tsv").write_text("demo\n")
    notes = outdir / "ft_cadis" / "notes.txt"
    notes.write_text("mine\n")
    demo.prepare_outdir(outdir)
    assert notes.read_text() == "mine\n"
    assert sorted(p.name for p in (outdir / "ft_cadis").iterdir()) == ["ft_cadis.tsv", "notes.txt"]
    assert not (outdir / "ft_cadis.tsv").exists()


def test_bench_json_refuses_to_replace_a_file_that_is_no_bench_result(tmp_path, cli_error, files_of, monkeypatch):
    monkeypatch.setattr(bench, "bench_config", lambda name, *a, **k: {"config": name})
    monkeypatch.setattr(bench, "matmul_gflops", lambda *a, **k: {})
    monkeypatch.setattr(bench, "format_table", lambda result: "")
    argv = ["--configs", "digits", "--device", "cpu", "--weights", "random"]
    foreign = tmp_path / "results.json"
    foreign.write_text('{"my": "data"}\n')
    before = files_of(tmp_path)
    line = cli_error(bench.main, argv + ["--json", foreign])
    assert f"--json {foreign}" in line and "--overwrite" in line, line
    assert files_of(tmp_path) == before
    bench.main(argv + ["--json", str(foreign), "--overwrite"])
    assert json.loads(foreign.read_text())["configs"] == [{"config": "digits"}]
    bench.main(argv + ["--json", str(foreign)])  # a bench result is replaced by the next one
    assert json.loads(foreign.read_text())["configs"] == [{"config": "digits"}]


# ---------------------------------------------------------------------------------- replaced or corrupted weights
def test_resume_refuses_a_replaced_default_classifier_file(tmp_path, monkeypatch, cli_error, files_of):
    import classifier

    default = tmp_path / "models" / "digits_vit_tiny.pt"
    default.parent.mkdir()
    shutil.copy(CLASSIFIER, default)
    monkeypatch.setattr(classifier, "DIGITS_CHECKPOINT", default)
    out = tmp_path / "log.tsv"
    argv = CERTIFY + ["--outfile", str(out), "--max_images", "2"]
    certify.main(argv)
    state = torch.load(default, weights_only=True)
    torch.save({k: v * 1.01 for k, v in state.items()}, default)  # another classifier under the default name
    before = files_of(out.parent)
    line = cli_error(certify.main, argv[:-1] + ["3", "--resume"])
    assert f"{default}: not the file the log {out} was written with" in line, line
    assert files_of(out.parent) == before


def test_training_records_the_default_classifier_file(tmp_path, monkeypatch):
    import classifier

    default = tmp_path / "digits_vit_tiny.pt"
    shutil.copy(CLASSIFIER, default)
    monkeypatch.setattr(classifier, "DIGITS_CHECKPOINT", default)
    cfg = training.resolve_config(training.TrainConfig(dataset="digits", train_noise_sd=0.25, device="cpu",
                                                       outdir=str(tmp_path / "run")))
    paths = {role: Path(path) for role, (_, path) in training.checkpoint_files(cfg).items()}
    assert default in paths.values() and DENOISER.resolve() in {p.resolve() for p in paths.values()}


def test_a_corrupted_training_checkpoint_is_refused(tmp_path, cli_error):
    out = tmp_path / "run"
    train.main(TRAIN + ["--outdir", str(out), "--max_steps", "1"])
    ckpt = out / "checkpoint-step1.pth.tar"
    data = bytearray(ckpt.read_bytes())
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    name = next(k for k in state if k.endswith("head.weight"))
    raw = state[name].numpy().tobytes()
    where = bytes(data).find(raw[:64])  # the tensor's bytes inside the zip: flip one of them
    assert where > 0
    data[where + 3] ^= 0x40
    ckpt.write_bytes(bytes(data))
    assert not torch.equal(torch.load(ckpt, weights_only=True)["state_dict"][name], state[name])  # torch loads it
    line = cli_error(train.main, ["--dataset", "digits", "--resume", str(ckpt), "--device", "cpu", "--workers", "0",
                                  "--no_progress", "--no_test", "--max_steps", "2"])
    assert f"--resume {ckpt}" in line and "sha256" in line, line
    line = cli_error(certify.main, CERTIFY + ["--finetuned_path", str(ckpt), "--outfile", str(tmp_path / "c.tsv"),
                                              "--max_images", "1"])
    assert f"--finetuned_path {ckpt}" in line and "sha256" in line, line
    record = Path(str(ckpt) + ".sha256").read_text()  # what sha256sum -c reads
    assert record.endswith(f"  {ckpt.name}\n") and len(record.split()[0]) == 64


def test_a_file_without_a_recorded_hash_loads_with_a_warning(tmp_path):
    plain = tmp_path / "clf.pt"
    torch.save(torch.load(CLASSIFIER, weights_only=True), plain)
    with pytest.warns(UserWarning, match="no recorded content hash"):
        checkpoints.load(plain, "--classifier_ckpt")
    files.atomic_torch_save({"w": torch.ones(2)}, tmp_path / "ours.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(checkpoints.load(tmp_path / "ours.pt", "--x")["w"], torch.ones(2))
        for shipped in (CLASSIFIER, DENOISER):  # their records ship beside them
            checkpoints.load(shipped, "--x")


# -------------------------------------------------------------------------------------------- a classifier gone NaN
def test_non_finite_logits_are_an_error(tmp_path, cli_error, files_of):
    state = torch.load(CLASSIFIER, weights_only=True)
    state = {k: (torch.full_like(v, float("nan")) if k.endswith("head.weight") else v) for k, v in state.items()}
    nan = tmp_path / "nan.pt"
    torch.save(state, nan)
    out = tmp_path / "log.tsv"
    line = cli_error(certify.main, CERTIFY + ["--classifier_ckpt", str(nan), "--outfile", str(out),
                                              "--max_images", "2"])
    assert "non-finite" in line, line
    assert not out.exists() or _rows(out) == []


class _SometimesNaN(torch.nn.Module):
    """Logits of 3 classes, class 0 on top; every 7th sample's logits are NaN (inf with ``value``)."""

    def __init__(self, value: float = float("nan")):
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.tensor([3.0, 0.0, 0.0]).repeat(len(x), 1)
        logits[::7] = self.value
        return logits


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_every_counting_path_refuses_non_finite_logits(value):
    from core import NonFiniteLogitsError, Smooth
    from sequential import certify_sequential

    smoothed = Smooth(_SometimesNaN(value), 3, 0.25)
    x = torch.zeros(1, 4, 4)
    for call in (lambda: smoothed.certify(x, 10, 50, 0.001, 16), lambda: smoothed.predict(x, 50, 0.001, 16),
                 lambda: certify_sequential(smoothed, x, 10, 200, 0.001, 16, [0.0, 0.25])):
        with pytest.raises(NonFiniteLogitsError, match="non-finite logits"):
            call()


def test_a_run_warning_is_one_line_from_the_cli(capsys):
    from runkit.cli import run_cli
    from runkit.errors import RunWarning

    run_cli(lambda argv: warnings.warn("look here", RunWarning, stacklevel=2))
    assert capsys.readouterr().err == "warning: look here\n"
