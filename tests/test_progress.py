"""Progress off a terminal: one plain line per interval (Slurm logs), a bar only on a terminal."""
from __future__ import annotations

import io
import subprocess
import sys
import time

from conftest import REPO

from runkit.progress import Progress, format_seconds, is_terminal


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_at_most_one_per_interval() -> None:
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(total=100, desc="certify", unit="img", interval=60.0, stream=out, clock=clock)
    assert not is_terminal(out) and progress.bar is None
    for _ in range(100):  # 100 images, 2.5 s each: 250 s of work
        clock.now += 2.5
        progress.update(1)
        progress.set_postfix(acc="0.900")
    progress.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 5  # at 60, 120, 180, 240 s, and the last one at close
    assert lines[0].startswith("certify: 24/100 img, 0.4 img/s, ETA 3m10s")
    assert lines[0].endswith("acc 0.900")
    assert lines[-1].startswith("certify: 100/100 img")


def test_resumed_count_and_nothing_when_disabled() -> None:
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(range(3), total=10, initial=7, unit="img", interval=1.0, stream=out, clock=clock)
    for _ in progress:
        clock.now += 2.0
    assert out.getvalue().splitlines()[-1].startswith("10/10 img, 0.5 img/s")  # the rate leaves the 7 done out
    quiet = io.StringIO()
    for _ in Progress(range(5), interval=0.0, stream=quiet, enabled=False, clock=clock):
        clock.now += 1.0
    assert quiet.getvalue() == ""


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (0, 42, 595, 10_920)] == ["0s", "42s", "9m55s", "3h02m"]


def test_certify_to_a_file_writes_lines_not_a_bar(tmp_path) -> None:
    """certify.py ... 2>log: at most one progress line per --log_interval, plus the last one; no redraws."""
    err = tmp_path / "stderr.txt"
    start = time.monotonic()
    with open(err, "w") as stderr:
        subprocess.run([sys.executable, "certify.py", "--dataset", "digits", "--sigma", "0.25", "--N", "100",
                        "--N0", "20", "--max_images", "6", "--device", "cpu", "--precision", "fp32",
                        "--log_interval", "0.5", "--outfile", str(tmp_path / "log.tsv")],
                       cwd=REPO, stderr=stderr, stdout=subprocess.DEVNULL, check=True)
    wall = time.monotonic() - start
    text = err.read_text()
    lines = [line for line in text.splitlines() if " img/s" in line]
    assert "\r" not in text
    assert 1 <= len(lines) <= wall / 0.5 + 1
    assert lines[-1].startswith("6/6 img")
    assert " acc " in lines[-1] and "ETA" in lines[0]
