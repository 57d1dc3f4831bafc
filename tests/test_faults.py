"""Nothing lost, nothing mixed: a full disk, unwritable or immutable outputs, a Ctrl-C at any moment, paths that
are no regular files, a corrupt log row, and the messages that tell what to do. Every such fault is one ``error:``
line (exit status 2; a Ctrl-C: exit status 130), before any work where it can be seen then, and the files written
before it stay complete (``tests/faults.py`` injects the faults).

Runs on the shipped digits models (``models/``), without the denoiser where it is not the point, a few images each.
"""
from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import faults

REPO = Path(__file__).resolve().parents[1]
CLF = REPO / "models" / "digits_vit_tiny.pt"
DEN = REPO / "models" / "digits_denoiser.pt"
SCRIPTS = ("certify.py", "predict.py", "train.py", "analyze.py", "demo.py", "bench.py")


def certify_args(out: Path, *extra: str, images: int = 6) -> list[str]:
    return ["--dataset", "digits", "--sigma", "0.1", "--N0", "10", "--N", "40", "--max_images", str(images),
            "--device", "cpu", "--no_progress", "--seed", "3", "--precision", "fp32", "--classifier_ckpt", str(CLF),
            "--denoiser_ckpt", "none", "--batch_size", "64", "--outfile", str(out), *map(str, extra)]


def train_args(outdir: Path, *extra: str) -> list[str]:
    return ["--dataset", "digits", "--denoiser_ckpt", str(DEN), "--classifier_ckpt", str(CLF), "--device", "cpu",
            "--batch", "8", "--num_noises", "2", "--workers", "0", "--log_every", "1", "--test_per_class", "1",
            "--train_noise_sd", "0.25", "--epochs", "1", "--warmup_epochs", "0.01", "--blr", "0.05", "--num-steps",
            "1", "--precision", "fp32", "--no_progress", "--outdir", str(outdir), *map(str, extra)]


def _rows(path: Path) -> list[str]:
    """The complete rows of a log, time column left out (the only column that differs between equal runs)."""
    text = path.read_text()
    lines = text.split("\n")[1:-1] if text.endswith("\n") else text.split("\n")[1:-1]
    return ["\t".join(line.split("\t")[:5]) for line in lines]


def _one_error(proc: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a process that failed with exit status 2 (no traceback)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("warning")]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def _run(argv: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    env = kwargs.pop("env", None) or dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))

    def limits() -> None:  # a script that reads /dev/zero whole must not take the machine's memory with it
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limits, **kwargs)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def no_models(monkeypatch):
    """Loading a model fails the test: what is refused must be refused before the models load."""
    import certification
    import training

    def refuse(*args, **kwargs):
        raise AssertionError("the models were loaded")
    monkeypatch.setattr(certification, "build_smoothed", refuse)
    monkeypatch.setattr(training, "build_run", refuse)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted certify.py log of 6 images."""
    import certify
    out = tmp_path_factory.mktemp("reference") / "log.tsv"
    certify.main(certify_args(out))
    return out


# ---------------------------------------------------------------------------------------------------------------
# A corrupt row is refused before any work
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("radius", ["nan", "inf", "-0.5"])
def test_resume_refuses_a_log_with_an_impossible_radius_before_any_work(reference, tmp_path, cli_error, files_of,
                                                                       no_models, radius):
    import certify
    out = tmp_path / "log.tsv"
    shutil.copy(reference.with_name("log.tsv.json"), tmp_path)
    lines = reference.read_text().split("\n")
    fields = lines[2].split("\t")
    fields[3] = radius
    lines[2] = "\t".join(fields)
    out.write_text("\n".join(lines[:4]) + "\n")
    before = files_of(tmp_path)
    line = cli_error(certify.main, certify_args(out, "--resume"))
    assert f"{out}: line 3 has radius {float(radius)}" in line, line
    assert files_of(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C at any moment: exit status 130, no traceback
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_while_a_script_imports_its_libraries_exits_130_without_a_traceback(script, tmp_path):
    """SIGINT the moment the script first imports numpy or torch (what a Ctrl-C in the first seconds hits)."""
    proc = _run(faults.command(REPO / script, "--help"), env=faults.environment(sigint_on_import=["numpy", "torch"]))
    assert proc.returncode == 130 and "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, \
        proc.stderr[-3000:]
    assert proc.stdout == "" and "interrupted" in proc.stderr  # stopped before --help was parsed


def test_ctrl_c_during_the_work_exits_130_and_keeps_the_rows(reference, tmp_path):
    out = tmp_path / "log.tsv"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(REPO / "certify.py"), *certify_args(out, images=300)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while (not out.exists() or out.read_text().count("\n") < 3) and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err, err[-3000:]
    rows = _rows(out)[:6]
    assert len(rows) >= 2 and rows == _rows(reference)[:len(rows)]


# ---------------------------------------------------------------------------------------------------------------
# Paths that must be regular files
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


@contextlib.contextmanager
def _deadline(seconds: float):
    """Fail a test that would hang (e.g. opening a FIFO nobody writes to) after ``seconds``."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: it hangs")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("script, flag", [
    *[("certify", flag) for flag in ("--classifier_ckpt", "--denoiser_ckpt", "--outfile", "--finetuned_path")],
    *[("train", flag) for flag in ("--resume", "--load_from", "--classifier_ckpt", "--denoiser_ckpt")],
])
def test_a_fifo_given_for_a_file_is_refused_at_once(script, flag, fifo, tmp_path, cli_error):
    import certify
    import train
    argv = certify_args(tmp_path / "log.tsv") if script == "certify" else train_args(tmp_path / "run", "--max_steps", "1")
    if flag in argv:
        argv[argv.index(flag) + 1] = str(fifo)
    else:
        argv += [flag, str(fifo)]
    with _deadline(20):
        line = cli_error((certify if script == "certify" else train).main, argv)
    assert f"{flag} {fifo}: is a FIFO, not a regular file" in line, line


@pytest.mark.parametrize("what", ["fifo", "/dev/zero", "--out fifo", "--plot fifo"])
def test_analyze_refuses_a_fifo_or_a_device_at_once(what, fifo, reference):
    if what == "--plot fifo":
        fifo = fifo.with_name("pipe.png")
        os.mkfifo(fifo)
    path = str(fifo) if "fifo" in what else what
    argv = [str(reference), what.split()[0], path] if what.startswith("--") else [path]
    proc = _run([sys.executable, str(REPO / "analyze.py"), *argv], timeout=60)
    kind = "a FIFO" if "fifo" in what else "a character device"
    assert f"{path}: is {kind}, not a regular file" in _one_error(proc)


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_folder_or_fifo_given_as_a_checkpoint_is_named_as_such(kind, fifo, tmp_path, cli_error):
    from runkit import checkpoints
    from runkit.errors import UserError
    path = fifo if kind == "fifo" else tmp_path / "dir.pt"
    path.mkdir() if kind == "folder" else None
    with _deadline(20), pytest.raises(UserError) as err:
        checkpoints.load(path, "--load_from")
    expected = "a FIFO" if kind == "fifo" else "a folder"
    assert str(err.value) == f"--load_from {path}: is {expected}, not a regular file", err.value
    assert "not found" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# Messages that are true and say what to do
# ---------------------------------------------------------------------------------------------------------------


def test_merge_with_a_shard_sidecar_missing_advises_a_command_that_works(reference, tmp_path, cli_error):
    import certify
    out = tmp_path / "log.tsv"
    for k in range(2):
        certify.main(certify_args(out, "--shard", f"{k}/2"))
    (tmp_path / "log.tsv.shard1of2.json").unlink()
    line = cli_error(certify.main, ["--merge", str(out)])
    assert "log.tsv.shard1of2" in line and "--shard 1/2 --overwrite" in line and "K/S" not in line, line
    certify.main(certify_args(out, "--shard", "1/2", "--overwrite"))  # what it advises
    certify.main(["--merge", str(out)])
    assert _rows(out) == _rows(reference)


def test_merge_with_a_corrupt_shard_sidecar_says_it_is_corrupt(tmp_path, cli_error):
    import certify
    out = tmp_path / "log.tsv"
    for k in range(2):
        certify.main(certify_args(out, "--shard", f"{k}/2"))
    (tmp_path / "log.tsv.shard1of2.json").write_text('{"config": {"sigma": 0.1')
    line = cli_error(certify.main, ["--merge", str(out)])
    assert "log.tsv.shard1of2.json" in line and "not valid JSON" in line and "no configuration file" not in line
    assert "--shard 1/2 --overwrite" in line, line
    certify.main(certify_args(out, "--shard", "1/2", "--overwrite"))
    certify.main(["--merge", str(out)])


def test_predict_merge_of_certify_shards_names_the_script_that_merges_them(tmp_path, cli_error):
    import certify
    import predict
    out = tmp_path / "log.tsv"
    for k in range(2):
        certify.main(certify_args(out, "--shard", f"{k}/2"))
    line = cli_error(predict.main, ["--merge", str(out)])
    assert "--overwrite" not in line and "certify.py --merge" in line, line


def test_paper_style_with_a_corrupt_sidecar_says_it_is_corrupt(reference, tmp_path, cli_error):
    import analyze
    log = tmp_path / "log.tsv"
    shutil.copy(reference, log)
    (tmp_path / "log.tsv.json").write_text("{not json")
    line = cli_error(analyze.main, [str(log), "--style", "paper", "--format", "markdown"])
    assert "log.tsv.json" in line and "not valid JSON" in line and "no <log>.json beside it" not in line, line
