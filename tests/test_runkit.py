"""runkit: run locks (with real second processes), content fingerprints, file modes, output and flag checks,
devices and --precision auto."""
from __future__ import annotations

import math
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from runkit import devices, files
from runkit.cli import check_number
from runkit.devices import cpu_has_native_bf16, resolve_device, resolve_precision
from runkit.errors import UserError
from runkit.files import atomic_torch_save, atomic_write_text, check_fingerprint, check_output, file_fingerprint
from runkit.locks import lock_path, run_lock

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_run_lock_excludes_a_second_process_and_dies_with_it(tmp_path, sig, lock_held_elsewhere):
    lock = lock_path(tmp_path / "log.tsv")
    assert lock == tmp_path / "log.tsv.lock"
    with lock_held_elsewhere(lock) as proc:
        with pytest.raises(UserError, match=rf"--outfile x is in use by pid {proc.pid} on .*lock file"):
            with run_lock(lock, "--outfile x"):
                pass
        proc.send_signal(sig)
        proc.wait(timeout=30)
    # the kernel released the dead process's lock (its file stays after kill -9): no stale lock
    with run_lock(lock, "--outfile x"):
        assert lock.is_file()
    assert not lock.exists()


def test_run_lock_refuses_this_process_twice_and_keeps_the_first(tmp_path):
    lock = lock_path(tmp_path, is_dir=True)
    assert lock == tmp_path / ".lock"
    with run_lock(lock, "--outdir d"):
        with pytest.raises(UserError, match="in use by this process"):
            with run_lock(lock, "--outdir d"):
                pass
        # the refused attempt must not have released the first lock (POSIX locks drop on any close)
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            import sys; sys.path.insert(0, {str(REPO)!r})
            from runkit.errors import UserError
            from runkit.locks import run_lock
            try:
                with run_lock({str(lock)!r}, "--outdir d"):
                    print("acquired")
            except UserError as err:
                print("refused", err)
        """)], capture_output=True, text=True, timeout=60)
        assert proc.stdout.startswith("refused") and f"pid {os.getpid()}" in proc.stdout


def test_fingerprint_full_and_sampled(tmp_path, monkeypatch):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    data = os.urandom(300_000)
    a.write_bytes(data)
    b.write_bytes(data)
    assert file_fingerprint(a) == file_fingerprint(b) and file_fingerprint(a).startswith("300000:")
    b.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert file_fingerprint(a) != file_fingerprint(b)
    # large files: sampled chunks (the first and last included), size in the fingerprint
    monkeypatch.setattr(files, "FINGERPRINT_FULL_BYTES", 1000)
    monkeypatch.setattr(files, "FINGERPRINT_CHUNK", 100)
    monkeypatch.setattr(files, "FINGERPRINT_CHUNKS", 8)
    fp = file_fingerprint(a)
    for offset in (0, 300_000 - 1, (300_000 - 100) * 3 // 7 + 50):
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        b.write_bytes(bytes(changed))
        assert file_fingerprint(b) != fp, offset
    b.write_bytes(data + b"\0")
    assert file_fingerprint(b) != fp
    check_fingerprint(a, fp, "--finetuned_path", "the log x")
    check_fingerprint(b, None, "--finetuned_path", "the log x")
    with pytest.raises(UserError, match=r"--finetuned_path .*b\.pt: not the file the log x was written with"):
        check_fingerprint(b, fp, "--finetuned_path", "the log x")


def test_atomic_writes_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.json", "{}\n")
        atomic_torch_save({"x": torch.zeros(1)}, tmp_path / "c.pth.tar")
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640
        assert stat.S_IMODE((tmp_path / "c.pth.tar").stat().st_mode) == 0o640
        os.chmod(tmp_path / "a.json", 0o604)  # a replaced file keeps its own mode
        atomic_write_text(tmp_path / "a.json", "[]\n")
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o604
        assert (tmp_path / "a.json").read_text() == "[]\n"
    finally:
        os.umask(old)
    assert files.process_umask() == old
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_output_location_checks(tmp_path):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    assert check_output(tmp_path / "new" / "deeper" / "log.tsv", "--outfile") == tmp_path / "new/deeper/log.tsv"
    assert check_output(tmp_path / "new" / "run", "--outdir", folder=True) == tmp_path / "new/run"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    with pytest.raises(UserError, match=r"^--outfile .*file\.txt/sub/log\.tsv: .*file\.txt is a file, not a folder"):
        check_output(afile / "sub" / "log.tsv", "--outfile")
    with pytest.raises(UserError, match=r"^--json .*: is a folder; name a file"):
        check_output(tmp_path, "--json")
    with pytest.raises(UserError, match=r"^--outdir .*file\.txt: exists and is not a folder"):
        check_output(afile, "--outdir", folder=True)
    with pytest.raises(UserError, match=r"^--outdir .*file\.txt/run: .*is a file, not a folder"):
        check_output(afile / "run", "--outdir", folder=True)


def _access_by_mode_bits(path, mode: int) -> bool:
    """os.access as an unprivileged owner sees it: the owner's permission bits (root's os.access ignores them)."""
    bits = os.stat(path).st_mode
    return all(bits & owner for flag, owner in ((os.R_OK, 0o400), (os.W_OK, 0o200), (os.X_OK, 0o100)) if mode & flag)


def test_unwritable_output_location(tmp_path, monkeypatch):
    if os.geteuid() == 0:  # root may write anywhere: judge by the permission bits, as for any other user
        monkeypatch.setattr(os, "access", _access_by_mode_bits)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(UserError, match="permission denied"):
            check_output(ro / "log.tsv", "--outfile")
        with pytest.raises(UserError, match="permission denied"):
            check_output(ro / "run", "--outdir", folder=True)
    finally:
        ro.chmod(0o755)


def test_check_number_names_the_flag():
    check_number("--alpha", 0.001, 0, 1, low_open=True, high_open=True)
    check_number("--lr", None, 0)
    for value in (1.5, 0.0, math.nan, math.inf):
        with pytest.raises(UserError, match=rf"^--alpha {value}: must be a finite number > 0 and < 1$"):
            check_number("--alpha", value, 0, 1, low_open=True, high_open=True)
    with pytest.raises(UserError, match=r"^--lr -1.0: must be a finite number >= 0$"):
        check_number("--lr", -1.0, 0)
    with pytest.raises(UserError, match=r"^--eps nan: must be a finite number$"):
        check_number("--eps", math.nan)


def test_devices_this_machine_lacks_are_user_errors():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(UserError, match=r"^--device meta: not a device this program runs on"):
        resolve_device("meta")
    with pytest.raises(UserError, match=r"^--device nonsense: unknown device"):
        resolve_device("nonsense")
    for kind, present in (("mps", torch.backends.mps.is_available()),
                          ("xpu", hasattr(torch, "xpu") and torch.xpu.is_available()),
                          ("cuda", torch.cuda.is_available())):
        if not present:
            with pytest.raises(UserError, match=rf"^--device {kind}: {kind.upper()} is not available"):
                resolve_device(kind)


CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 {}\nbogomips\t: 1\n"


def test_precision_auto(monkeypatch):
    assert cpu_has_native_bf16(CPUINFO.format("avx512f avx512_bf16"))
    assert cpu_has_native_bf16(CPUINFO.format("amx_bf16 amx_tile"))
    assert not cpu_has_native_bf16(CPUINFO.format("avx512f"))
    assert not cpu_has_native_bf16("")
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda cpuinfo=None: True)
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda cpuinfo=None: False)
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("fp16", cpu) == "fp16"
    with pytest.raises(UserError, match=r"^--precision 'fp64': choose one of auto, fp32, bf16, fp16"):
        resolve_precision("fp64", cpu)
    monkeypatch.setattr(devices, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_precision("bf16", cpu) == "bf16"
        assert resolve_precision("bf16", cpu) == "bf16"  # warned once per process
    assert len(caught) == 1
    assert "no native bf16" in str(caught[0].message)
    assert " GFLOP/s against " in str(caught[0].message) and "in fp32 here" in str(caught[0].message)


def test_run_lock_in_a_folder_that_does_not_exist_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"^--outdir x: cannot create its lock file .*missing/\.lock"):
        with run_lock(tmp_path / "missing" / ".lock", "--outdir x"):
            pass


def test_bf16_without_native_support_is_not_auto_and_warns_with_its_measured_cost():
    """A real process whose oneDNN may use AVX2 at most (as on an AVX2-only CPU): auto is fp32, and an explicit bf16
    warns once with the probe's rates, bf16 measurably slower than fp32."""
    code = ("import sys, warnings, torch; sys.path.insert(0, %r); from runkit import devices\n"
            "warnings.simplefilter('always')\n"
            "print(devices.resolve_precision('auto', torch.device('cpu')))\n"
            "print(devices.resolve_precision('bf16', torch.device('cpu')))\n" % str(REPO))
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["fp32", "bf16"]
    m = re.search(r"a bf16 matmul ran at ([\d.]+) GFLOP/s against ([\d.]+) in fp32 here", proc.stderr)
    assert m and proc.stderr.count("no native bf16") == 1, proc.stderr
    assert float(m.group(1)) < float(m.group(2))


def test_rng_states_round_trip_every_generator():
    import random

    import numpy as np

    from runkit.rng import gather_rng_states, rng_state, seed_everything, set_rng_state

    seed_everything(3)
    state = rng_state(torch.device("cpu"))
    assert gather_rng_states(torch.device("cpu"))[0]["python"] == state["python"]  # one process: its own state
    draws = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state, torch.device("cpu"))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]
    seed_everything(4)
    assert not torch.equal(torch.rand(3), draws[0])


def test_resumed_config_keeps_the_runs_values_and_refuses_changes():
    import dataclasses

    from runkit.resume import flags_not_at_default, parse_override, resumed_config

    @dataclasses.dataclass
    class Config:
        dataset: str
        lr: float = 1.0
        epochs: int = 2
        outdir: str = "a"
        resume: str = ""
        override: str = ""

    recorded = {"dataset": "d", "lr": 0.5, "epochs": 2, "outdir": "old", "resume": "", "override": ""}

    def resume(config: Config, given=None) -> Config:
        return resumed_config(config, given, recorded, lambda c: c, operational={"outdir", "resume", "override"},
                              paths=(), may_grow={"epochs"})

    assert flags_not_at_default(Config("d", outdir="b")) == {"dataset", "outdir"}
    merged = resume(Config("d", outdir="b", resume="ck"))
    assert (merged.lr, merged.outdir, merged.resume) == (0.5, "b", "ck")  # left out: the run's; operational: now's
    assert resume(Config("d", epochs=5, resume="ck")).epochs == 5  # may grow
    with pytest.raises(UserError, match=r"--resume ck: --epochs 1 \(the run: 2\), --lr 2.0 \(the run: 0.5\) would"):
        resume(Config("d", lr=2.0, epochs=1, resume="ck"))
    assert resume(Config("d", lr=2.0, resume="ck", override="--lr")).lr == 2.0
    assert resume(Config("d", lr=0.5, resume="ck"), given={"dataset", "lr"}).lr == 0.5  # given at the run's value
    with pytest.raises(UserError, match="--override lr,x-y: no flag --x_y"):
        parse_override("lr,x-y", ["lr"])


def test_locked_output_folder_removes_stale_temporaries_and_locks(tmp_path):
    from runkit.locks import locked_output_folder

    out = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError):
        with locked_output_folder(out, "--outdir x", True, ["*.pth.tar"]):
            assert (out / ".lock").is_file()
            raise RuntimeError("refused")
    assert not (tmp_path / "new").exists()  # a refused run leaves no folder it created
    out.mkdir(parents=True)
    (out / ".ckpt.pth.tar.a1b2c3d4.tmp").write_bytes(b"partial")
    (out / ".other.txt.a1b2c3d4.tmp").write_bytes(b"not ours")
    with locked_output_folder(out, "--outdir x", True, ["*.pth.tar"]):
        with pytest.raises(UserError, match="--outdir x is in use by this process"):
            with locked_output_folder(out, "--outdir x", True, ["*.pth.tar"]):
                pass
    assert sorted(p.name for p in out.iterdir()) == [".other.txt.a1b2c3d4.tmp"]
