"""Nothing lost, nothing mixed: a full disk, unwritable or immutable outputs, a Ctrl-C at any moment, paths that
are no regular files, a corrupt log row, and the messages that tell what to do. Every such fault is one ``error:``
line (exit status 2; a Ctrl-C: exit status 130), before any work where it can be seen then, and the files written
before it stay complete (``tests/faults.py`` injects the faults).

Runs on the shipped digits models (``models/``), without the denoiser where it is not the point, a few images each.
"""
from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import faults
import pytest
import torch

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


@contextlib.contextmanager
def _rank_0_of_2():
    """certification runs as rank 0 of 2 processes inside the block (the other rank's part never comes)."""
    import certification
    from runkit.distributed import DistInfo

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(certification, "init_distributed", lambda *a, **k: DistInfo(0, 2, 0, torch.device("cpu")))
        mp.setattr(certification, "barrier", lambda: None)
        yield


def _error_line(main, argv, capsys) -> str:
    """Run a CLI's ``main`` as its script does; assert exit status 2, exactly one ``error:`` line (other lines, such
    as ``resuming ...``, may come before it) and no traceback; return the error line."""
    from runkit.cli import run_cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(main, [str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert exc.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


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
# A full disk
# ---------------------------------------------------------------------------------------------------------------


def _assert_prefix(log: Path, reference: Path, at_least: int = 0) -> int:
    """``log`` holds the first rows of ``reference`` (a last line cut short aside); returns how many."""
    rows = _rows(log)
    assert len(rows) >= at_least and rows == _rows(reference)[:len(rows)], (rows, _rows(reference))
    return len(rows)


@pytest.mark.slow
def test_a_full_disk_while_certifying_fresh_and_on_resume_loses_nothing(tmp_path, capsys):
    """A real tmpfs that fills up: a fresh run stops after the rows that fit, a --resume on the still full disk
    stops too, and once space is freed a --resume completes the log as an uninterrupted run writes it. (Where this
    process may not mount a tmpfs, the same is asserted through an injected ENOSPC.)"""
    import certify
    images = 150  # about 5 KiB of rows: more than the one page the full disk leaves for the log
    reference = tmp_path / "reference" / "log.tsv"
    certify.main(certify_args(reference, images=images))
    with faults.small_tmpfs(tmp_path / "disk") as disk:
        if disk is None:
            warnings.warn("mounting a tmpfs is refused here: the full disk is an injected ENOSPC", stacklevel=1)
            disk = tmp_path / "disk"
        out = disk / "log.tsv"
        with contextlib.ExitStack() as stack:
            if disk.is_mount():  # room for the lock file, the sidecar and one page of rows
                filler = faults.fill(disk, leave=3 * faults.PAGE)
            else:
                filler = None
                stack.enter_context(faults.write_faults("log.tsv", k=40))
            line = _error_line(certify.main, certify_args(out, images=images), capsys)
        assert f"cannot write {out}: No space left on device" in line and "free space, then" in line, line
        assert "--resume" in line, line
        done = _assert_prefix(out, reference, at_least=30)
        assert done < images
        with contextlib.ExitStack() as stack:
            if filler is None:
                stack.enter_context(faults.write_faults("log.tsv", k=2))
            line = _error_line(certify.main, certify_args(out, "--resume", images=images), capsys)
        assert f"cannot write {out}: No space left on device" in line and "--resume" in line, line
        _assert_prefix(out, reference, at_least=done)
        if filler is not None:
            filler.unlink()
        certify.main(certify_args(out, "--resume", images=images))
        assert _rows(out) == _rows(reference)
        assert sorted(p.name for p in disk.iterdir()) == ["log.tsv", "log.tsv.json"]


@pytest.mark.slow
def test_a_full_disk_while_train_saves_a_checkpoint_keeps_the_earlier_ones(tmp_path, cli_error):
    """train.py on a tmpfs that has room for one checkpoint: the second fails as one line, the first is intact, no
    temporary file is left, and once space is freed --resume auto completes the run. (Injected ENOSPC where a tmpfs
    cannot be mounted.)"""
    import train
    args = ("--max_steps", "2", "--ckpt_every_steps", "1", "--no_test", "--no_tensorboard")
    with faults.small_tmpfs(tmp_path / "disk", size_kib=8 << 10) as disk:
        if disk is None:
            warnings.warn("mounting a tmpfs is refused here: the full disk is an injected ENOSPC", stacklevel=1)
            disk = tmp_path / "disk"
        out = disk / "run"
        train.main(train_args(out, "--max_steps", "1", "--no_test", "--no_tensorboard"))
        first = (out / "checkpoint-step1.pth.tar").read_bytes()
        with contextlib.ExitStack() as stack:
            if disk.is_mount():
                filler = faults.fill(disk, leave=len(first) // 2)
            else:
                filler = None
                stack.enter_context(faults.write_faults(".checkpoint-step2.pth.tar.????????.tmp", k=3))
            line = cli_error(train.main, train_args(out, *args, "--resume", "auto"))
        assert f"cannot write {out / 'checkpoint-step2.pth.tar'}: No space left on device" in line, line
        assert "free space, then" in line and "--resume" in line, line
        assert (out / "checkpoint-step1.pth.tar").read_bytes() == first
        assert not list(out.glob(".*.tmp")) and not (out / ".lock").exists()
        if filler is not None:
            filler.unlink()
        result = train.main(train_args(out, *args, "--resume", "auto"))
        assert result["step"] == 2 and (out / "checkpoint-step2.pth.tar").is_file()


# ---------------------------------------------------------------------------------------------------------------
# An OSError at the k-th write of each writer: one line, exit 2, the files written before intact, and the advised
# command completes the work
# ---------------------------------------------------------------------------------------------------------------


CERTIFY_WRITERS = {  # name -> (file name glob, k, extra flags, as rank 0 of 2 processes, the file named)
    "log (fresh)": ("log.tsv", 3, (), False, "log.tsv"),
    "log (resume)": ("log.tsv", 1, ("--resume",), False, "log.tsv"),
    "sidecar": (".log.tsv.json.*.tmp", 1, (), False, "log.tsv.json"),
    "lock": ("log.tsv.lock", 1, (), False, "log.tsv.lock"),
    "rank part": ("log.tsv.rank0", 2, (), True, "log.tsv.rank0"),
    "merge of the rank parts": (".log.tsv.????????.tmp", 1, (), True, "log.tsv"),
    "shard": ("log.tsv.shard1of2", 2, ("--shard", "1/2"), False, "log.tsv.shard1of2"),
}


@pytest.mark.parametrize("writer", list(CERTIFY_WRITERS))
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_a_write_error_of_a_certification_writer_is_one_line_and_loses_nothing(writer, code, reference, tmp_path,
                                                                              capsys, files_of):
    import certify
    match, k, extra, two, named = CERTIFY_WRITERS[writer]
    out = tmp_path / "log.tsv"
    if "--resume" in extra:
        certify.main(certify_args(out, images=3))
    before = files_of(tmp_path)
    with _rank_0_of_2() if two else contextlib.nullcontext(), faults.write_faults(match, k, code) as failed:
        line = _error_line(certify.main, certify_args(out, *extra), capsys)
    assert failed.failed, f"no write into {match}"
    assert f"cannot write {tmp_path / named}: {os.strerror(code)}" in line, line
    assert ("free space, then" in line) == (code != errno.EIO) and "--resume" in line, line
    after = files_of(tmp_path)
    for path, content in before.items():  # what was there is intact (appended to at most)
        assert after[path].startswith(content), path
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "log.tsv.lock").exists()
    if "--shard" in extra:
        certify.main(certify_args(out, "--resume", *extra))
        certify.main(certify_args(out, "--shard", "0/2"))
        certify.main(["--merge", str(out)])
    else:  # (a 2-process run resumed by one process)
        certify.main(certify_args(out, "--resume"))
    assert _rows(out) == _rows(reference)


@pytest.mark.parametrize("match, named", [(".log.tsv.????????.tmp", "log.tsv"),
                                          (".log.tsv.json.*.tmp", "log.tsv.json")])
def test_a_write_error_while_merging_shards_keeps_the_shards(match, named, reference, tmp_path, cli_error, files_of):
    import certify
    out = tmp_path / "log.tsv"
    for k in range(2):
        certify.main(certify_args(out, "--shard", f"{k}/2"))
    before = files_of(tmp_path)
    with faults.write_faults(match) as failed:
        line = cli_error(certify.main, ["--merge", str(out)])
    assert failed.failed and f"cannot write {tmp_path / named}: No space left" in line, line
    assert "free space, then" in line and "--merge" in line, line
    after = files_of(tmp_path)
    assert {p: after[p] for p in before} == before and not list(tmp_path.glob(".*.tmp"))
    certify.main(["--merge", str(out)])
    assert _rows(out) == _rows(reference)


TRAIN_WRITERS = {  # name -> (file name glob, k)
    "checkpoint": (".checkpoint-step2.pth.tar.????????.tmp", 2),
    "step log": ("log_steps.txt", 2),
    "epoch log": ("log.txt", 1),
}


@pytest.mark.parametrize("writer", list(TRAIN_WRITERS))
def test_a_write_error_of_a_train_writer_is_one_line_and_resume_completes(writer, tmp_path, cli_error):
    import train
    match, k = TRAIN_WRITERS[writer]
    out = tmp_path / "run"
    args = train_args(out, "--max_steps", "3", "--ckpt_every_steps", "1", "--no_test", "--no_tensorboard")
    with faults.write_faults(match, k) as failed:
        line = cli_error(train.main, args)
    assert failed.failed and "cannot write" in line and "No space left on device" in line, line
    assert "free space, then" in line and "--resume" in line, line
    assert not list(out.glob(".*.tmp")) and not (out / ".lock").exists()
    for ckpt in out.glob("checkpoint-*.pth.tar"):
        torch.load(ckpt, map_location="cpu", weights_only=True)  # complete
    result = train.main(args + ["--resume", "auto"])
    assert result["step"] == 3


def test_tensorboard_failing_to_write_warns_once_and_training_goes_on(tmp_path, capsys):
    import train
    out = tmp_path / "run"
    with faults.write_faults("events.out.tfevents.*", k=2) as failed:
        result = train.main(train_args(out, "--max_steps", "3", "--no_test"))
    assert failed.failed and result["step"] == 3 and (out / "checkpoint-step3.pth.tar").is_file()
    err = capsys.readouterr().err
    assert err.count("warning: TensorBoard") == 1 and "No space left on device" in err, err


@pytest.mark.parametrize("flag, name", [("--out", "table.md"), ("--plot", "plot.png")])
def test_a_write_error_of_an_analyze_output_keeps_the_previous_file(flag, name, reference, tmp_path, cli_error):
    import analyze
    target = tmp_path / name
    analyze.main([str(reference), flag, str(target)])
    previous = target.read_bytes()
    with faults.write_faults(name) as failed, faults.write_faults(f".{name}.*.tmp") as failed_tmp:
        line = cli_error(analyze.main, [str(reference), flag, str(target)])
    assert failed.failed or failed_tmp.failed
    assert f"cannot write {target}" in line and "free space, then" in line, line
    assert target.read_bytes() == previous and not list(tmp_path.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------------------------
# Append-only or immutable outputs (chattr +a / +i) are refused before the models load
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _attribute(path: Path, flag: str):
    """``chattr +<flag> path`` for the block (True), or False where this file system or process may not set it (or
    with ``FT_CADIS_NO_CHATTR=1``, to run the fallback)."""
    try:
        done = not os.environ.get("FT_CADIS_NO_CHATTR") and subprocess.run(
            ["chattr", f"+{flag}", str(path)], capture_output=True).returncode == 0
    except OSError:
        done = False
    try:
        yield done
    finally:
        if done:
            subprocess.run(["chattr", f"-{flag}", str(path)], capture_output=True)


@contextlib.contextmanager
def _protected(path: Path, flag: str):
    """``path`` append-only (``a``) or immutable (``i``) for the block: by chattr where allowed, else an injected
    ``PermissionError`` when it is opened for writing other than appending (``a``) or at all (``i``)."""
    with _attribute(path, flag) as done:
        if done:
            yield
            return
        warnings.warn(f"chattr +{flag} is not available here: the protection is an injected PermissionError",
                      stacklevel=1)
        real_os_open, real_open = os.open, open
        banned = os.O_WRONLY | os.O_RDWR

        def refused(file, flags) -> bool:
            try:
                same = os.path.realpath(os.fsdecode(file)) == os.path.realpath(path)
            except TypeError:
                return False
            return same and bool(flags & banned) and (flag == "i" or not flags & os.O_APPEND)

        def os_open(file, flags, *args, **kwargs):
            if refused(file, flags):
                raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), os.fsdecode(file))
            return real_os_open(file, flags, *args, **kwargs)

        def open_(file, mode="r", *args, **kwargs):
            flags = (os.O_RDWR if "+" in mode else os.O_WRONLY if any(c in mode for c in "wax") else 0) | \
                    (os.O_APPEND if "a" in mode else 0)
            if refused(file, flags):
                raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), os.fsdecode(file))
            return real_open(file, mode, *args, **kwargs)
        import builtins
        import io
        with pytest.MonkeyPatch.context() as mp:
            for owner, name, value in ((os, "open", os_open), (builtins, "open", open_), (io, "open", open_)):
                mp.setattr(owner, name, value)
            yield


@pytest.mark.parametrize("flag", ["a", "i"])
@pytest.mark.parametrize("name", ["log.tsv", "log.tsv.rank1"])
def test_resume_refuses_an_append_only_or_immutable_log_before_the_models_load(flag, name, reference, tmp_path,
                                                                              cli_error, files_of, no_models):
    import certify
    out = tmp_path / "log.tsv"
    for p in (reference, reference.with_name("log.tsv.json")):
        shutil.copy(p, tmp_path / p.name)
    lines = reference.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]))
    if name != "log.tsv":
        (tmp_path / name).write_text(lines[0] + lines[4])
    before = files_of(tmp_path)
    with _protected(tmp_path / name, flag):
        line = cli_error(certify.main, certify_args(out, "--resume"))
    assert f"{tmp_path / name}: cannot be written" in line and "append-only or immutable" in line, line
    assert files_of(tmp_path) == before


@pytest.mark.parametrize("flag", ["a", "i"])
@pytest.mark.parametrize("name", ["log_steps.txt", "log.txt"])
def test_train_resume_refuses_an_append_only_or_immutable_log_before_the_models_load(flag, name, tmp_path, cli_error,
                                                                                    files_of, monkeypatch):
    import train
    import training
    out = tmp_path / "run"
    train.main(train_args(out, "--max_steps", "1", "--no_test", "--no_tensorboard"))
    before = files_of(tmp_path)
    monkeypatch.setattr(training, "build_run", lambda *a, **k: pytest.fail("the models were loaded"))
    with _protected(out / name, flag):
        line = cli_error(train.main, train_args(out, "--max_steps", "2", "--resume", "auto", "--no_test",
                                                "--no_tensorboard"))
    assert f"{out / name}: cannot be written" in line and "append-only or immutable" in line, line
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
    argv = (certify_args(tmp_path / "log.tsv") if script == "certify"
            else train_args(tmp_path / "run", "--max_steps", "1"))
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
# train.py --resume takes the run's flags
# ---------------------------------------------------------------------------------------------------------------


def _epoch_rows(out: Path) -> list[list[str]]:
    return [line.split("\t") for line in (out / "log.txt").read_text().splitlines()[1:]]


def test_train_resume_without_dataset_takes_the_runs_flags(tmp_path):
    """A requeue script's resume names only the checkpoint (and where to run): --dataset and the flags of what the
    run writes (--no_test, --no_tensorboard, --test_per_class, --log_every, --ckpt_every_steps) are the run's."""
    import train
    out = tmp_path / "run"
    train.main(train_args(out, "--max_steps", "1", "--no_test", "--no_tensorboard", "--log_every", "2"))
    assert _epoch_rows(out)[0][9] == "nan"
    train.main(["--resume", str(out / "checkpoint-step1.pth.tar"), "--max_steps", "4", "--device", "cpu"])
    assert [row[9] for row in _epoch_rows(out)] == ["nan"]  # still no test pass
    assert not list(out.glob("*tfevents*"))
    steps = [line.split("\t")[0] for line in (out / "log_steps.txt").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "4"]  # --log_every 2 kept (and each run's last step; --log_every 10: 1 and 4)
    config = torch.load(out / "checkpoint-step4.pth.tar", map_location="cpu", weights_only=True)["config"]
    assert (config["no_test"], config["tensorboard"], config["log_every"], config["workers"]) == (True, False, 2, 0)


def test_train_without_dataset_and_without_resume_is_one_line(tmp_path, cli_error, files_of):
    import train
    argv = train_args(tmp_path / "run", "--max_steps", "1")
    del argv[:2]
    line = cli_error(train.main, argv)
    assert "--dataset" in line and "--resume" in line, line
    assert files_of(tmp_path) == {} and not (tmp_path / "run").exists()


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
