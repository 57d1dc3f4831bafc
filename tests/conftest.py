"""Shared pytest fixtures: the reference data in ``tests/fixtures`` (shipped with the repository), CLI-error and
run-lock helpers."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FIXTURES = REPO / "tests" / "fixtures"

# One intra-op thread per process: the suite runs multi-process jobs (gloo) and tiny models, where OpenMP threads
# oversubscribe the cores and slow everything down. OMP_NUM_THREADS overrides.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the tests marked ``cuda`` where no CUDA GPU is available (they are not skipped: a CPU run reports
    them as deselected, 0 skipped); wherever CUDA is available they run with the others."""
    if torch.cuda.is_available():
        return
    deselected = [item for item in items if item.get_closest_marker("cuda") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.get_closest_marker("cuda") is None]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``tests/fixtures``: upstream diffusion references, the tiny Hugging Face ViT, Cohen et al.'s published logs
    (where each comes from: the README.md in each folder)."""
    return FIXTURES


def _cli_error(main, argv, capsys) -> str:
    """Run a CLI's ``main`` through ``runkit.cli.run_cli``; assert exit status 2 and exactly one ``error: ...`` line on
    stderr (no traceback); return that line."""
    from runkit.cli import run_cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(main, [str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning")]
    assert exc.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def cli_error(capsys):
    """``cli_error(main, argv)``: the one ``error: ...`` line a CLI prints for bad input (exit status 2 checked)."""
    return lambda main, argv: _cli_error(main, argv, capsys)


def snapshot(*roots: Path) -> dict:
    """Every file under ``roots`` (files or folders) -> its bytes: compare before/after to show nothing changed."""
    files = [p for root in roots for p in ([root] if root.is_file() else sorted(root.rglob("*"))) if p.is_file()]
    return {str(p): p.read_bytes() for p in files}


@pytest.fixture
def files_of():
    """``files_of(*paths)``: :func:`snapshot` (file -> bytes), to assert that a refused command changed nothing."""
    return snapshot


@contextlib.contextmanager
def _lock_held_elsewhere(lock: Path, what: str = "--outfile x") -> Iterator[subprocess.Popen]:
    """Another process holds ``runkit.locks.run_lock(lock)`` inside the block (it is killed at the end)."""
    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from runkit.locks import run_lock\n"
            f"with run_lock({str(lock)!r}, {what!r}):\n    print('locked', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()


@pytest.fixture
def lock_held_elsewhere():
    """``with lock_held_elsewhere(lock_file) as proc:`` another live process holds that run lock (a real second
    process: POSIX locks do not exclude their own process)."""
    return _lock_held_elsewhere


@pytest.fixture(scope="session")
def cohen_logs(fixtures_dir: Path) -> Path:
    """Cohen et al.'s published certification and prediction logs (``certify/...``, ``predict/...``)."""
    return fixtures_dir / "cohen_logs"


class _RunsACommand:
    """What a malicious checkpoint carries: unpickling it (``torch.load(..., weights_only=False)``) creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def pickle_payload(tmp_path):
    """(payload, marker): a checkpoint holding ``payload`` creates ``marker`` if it is ever unpickled."""
    marker = tmp_path / "pwned"
    return _RunsACommand(marker), marker
