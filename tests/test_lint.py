"""CI lints before it tests: .ci/run fails on a lint error (shown on a temporary copy of the repository)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


def _copy_of_repo(dest: Path) -> Path:
    """The tracked files of the repository (as in a fresh clone) under ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.mark.slow
def test_ci_fails_on_a_lint_error_and_the_repository_is_clean(tmp_path):
    copy = _copy_of_repo(tmp_path / "repo")
    env = dict(os.environ, VENV=sys.prefix)
    clean = subprocess.run(["bash", "scripts/lint.sh"], cwd=copy, env=env, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    (copy / "bad_module.py").write_text("import os\n\n\ndef f():\n    return 1\n")  # F401: os imported, unused
    # if the lint step let this through, .ci/run would go on to the whole suite: the timeout makes that a failure
    bad = subprocess.run(["bash", ".ci/run"], cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "bad_module.py" in bad.stdout and "F401" in bad.stdout, bad.stdout + bad.stderr
    assert "passed" not in bad.stdout  # stopped before the tests
