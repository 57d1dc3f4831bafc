"""pool.py and the forward passes: many images in flight fill each pass, every row stays the one of the image alone;
a pass that runs out of memory is retried in halves; a compiled run compiles one shape; --batch_size auto on CUDA."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import certification
import certify
import core
import pool
from certification import certify_method
from core import Smooth, image_generator
from runkit.devices import torch_threads
from runkit.logs import HEADER
from sequential import default_sequential_radii

REPO = Path(__file__).resolve().parents[1]
DIGITS = ["--dataset", "digits", "--device", "cpu", "--no_progress", "--seed", "2", "--N0", "10", "--precision",
          "fp32", "--denoiser_ckpt", str(REPO / "models" / "digits_denoiser.pt"),
          "--classifier_ckpt", str(REPO / "models" / "digits_vit_tiny.pt")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def _rows(path: Path) -> list[list[str]]:
    """Every column but the time."""
    lines = Path(path).read_text().split("\n")
    names = lines[0].split("\t")
    return [[v for name, v in zip(names, line.split("\t")) if name != "time"] for line in lines[1:-1]]


class Brightness(nn.Module):
    """A stub base classifier of 10 classes: class 0 when the noisy image's mean pixel is above 1/2, else class 1.
    For a constant image of brightness 1/2 + d, pA = Phi(d / (sigma / sqrt(pixels)))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean((1, 2, 3)) - 0.5
        return torch.stack([m, -m] + [torch.full_like(m, -1.0)] * 8, 1)


def _stub_run(driver, images: torch.Tensor, n: int, batch_size: int, sigma: float = 0.25):
    smooth = Smooth(Brightness(), 10, sigma)
    method = certify_method(smooth, 100, n, 0.001, batch_size, default_sequential_radii("digits", sigma, n, 0.001))
    computations = ((i, method.steps(x, image_generator(5, i), 0)) for i, x in enumerate(images))
    finished = [(i, result) for i, [result], _ in driver(smooth, computations, batch_size)]
    return finished, smooth


def test_the_pool_fills_the_forward_passes_at_the_papers_n_and_changes_no_result():
    """Sequential CERTIFY at N = 100,000 (CIFAR-10's N; digits' sigma and radii) of 16 images, half with pA ~ 1 (as
    most digits test images) and half from pA = 0.54 to 1, some just above a radius' threshold (a stub base
    classifier on 3 x 4 x 4 images: the samples are cheap, and the stopping times alone decide how full the passes
    are): one image after the other, the early checkpoints' passes hold tens of samples; in the pool the mean pass
    is >= 90 % of the batch size, and every result is the same."""
    offsets = [0.45] * 8 + [0.004, 0.01, 0.02, 0.0366, 0.05, 0.073, 0.1088, 0.2]  # pA = Phi(offset / 0.036)
    images = torch.stack([torch.full((3, 4, 4), 0.5 + d) for d in offsets])
    alone, plain = _stub_run(pool.run_each, images, 100_000, 1000)
    pooled, smooth = _stub_run(pool.run_pool, images, 100_000, 1000)
    assert sorted(pooled) == alone and [i for i, _ in pooled] != [i for i, _ in alone]  # finished out of order
    used = [n for _, (_, _, n) in alone]
    assert max(used) == 100_000 and min(used) <= 200  # images stop from the first checkpoints to the last
    assert smooth.samples == plain.samples == sum(used) + 100 * len(images)
    assert smooth.samples / smooth.passes >= 0.9 * 1000
    assert plain.samples / plain.passes < 0.6 * 1000


class NaNOnBrightImages(Brightness):
    """Brightness, but NaN logits for every sample of an image brighter than 0.9."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return torch.where(x.mean((1, 2, 3))[:, None] > 0.9, float("nan"), logits)


def test_the_pool_refuses_non_finite_logits_of_any_image():
    images = torch.stack([torch.full((3, 4, 4), v) for v in (0.6, 0.7, 1.3, 0.6)])  # the third one's are NaN
    smooth = Smooth(NaNOnBrightImages(), 10, 0.25)
    method = certify_method(smooth, 100, 1000, 0.001, 256, [0.0, 0.25])
    computations = ((i, method.steps(x, image_generator(5, i), 0)) for i, x in enumerate(images))
    with pytest.raises(core.NonFiniteLogitsError, match="non-finite logits"):
        list(pool.run_pool(smooth, computations, 256))


# ---------------------------------------------------------------------------------------------------------------
# certify.py: the pool is the default; --no_pool gives the same rows
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, images", [(["--sequential"], 3),
                                          pytest.param(["--sequential", "--skip_wrong"], 8, marks=pytest.mark.slow),
                                          pytest.param([], 8, marks=pytest.mark.slow)])
def test_certify_logs_are_identical_with_and_without_the_pool(tmp_path, mode, images, capsys):
    """The shipped digits models, fp32: the pool (default) writes the rows --no_pool writes, and fuller passes."""
    common = DIGITS + ["--sigma", "0.25", "--N", "150", "--max_images", str(images), "--batch_size", "48", *mode]
    capsys.readouterr()
    certify.main(common + ["--outfile", str(tmp_path / "pool.tsv")])
    pooled = capsys.readouterr().out
    certify.main(common + ["--no_pool", "--outfile", str(tmp_path / "alone.tsv")])
    alone = capsys.readouterr().out
    assert _rows(tmp_path / "pool.tsv") == _rows(tmp_path / "alone.tsv")
    assert [int(r[0]) for r in _rows(tmp_path / "pool.tsv")] == list(range(images))  # the merged log: idx order

    def mean_batch(out: str) -> float:
        [line] = [line for line in out.splitlines() if "forward passes:" in line]
        return float(line.split("mean batch ")[1].split()[0])
    assert "(pool of images in flight)" in pooled and "one image at a time, --no_pool" in alone
    assert mean_batch(alone) < mean_batch(pooled) <= 48


@pytest.mark.slow
def test_several_classifiers_in_the_pool_equal_one_image_at_a_time(tmp_path):
    common = DIGITS + ["--sigma", "0.5", "--N", "200", "--max_images", "4", "--batch_size", "48", "--sequential",
                       "--off-the-shelf", "--finetuned_path", str(REPO / "models" / "digits_vit_tiny.pt")]
    certify.main(common + ["--outfile", str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv")])
    certify.main(common + ["--no_pool", "--outfile", str(tmp_path / "a1.tsv"), str(tmp_path / "b1.tsv")])
    assert _rows(tmp_path / "a.tsv") == _rows(tmp_path / "a1.tsv") == _rows(tmp_path / "b1.tsv")
    assert _rows(tmp_path / "b.tsv") == _rows(tmp_path / "b1.tsv")


@pytest.mark.slow
def test_rows_the_pool_wrote_out_of_order_resume_to_the_uninterrupted_log(tmp_path, monkeypatch):
    """Images finish in another order than they started: a run interrupted right after writing a row below an
    earlier one holds its rows out of idx order; --resume reads them by idx, computes the others and merges the log
    into idx order: the rows of an uninterrupted run."""
    common = DIGITS + ["--sigma", "0.5", "--N", "300", "--max_images", "12", "--sequential", "--batch_size", "128"]
    certify.main(common + ["--outfile", str(tmp_path / "ref.tsv")])
    real = certification.run_pool

    def interrupted(*args, **kwargs):
        finished = []
        for item in real(*args, **kwargs):
            yield item  # (its row is written before the next one is asked for)
            finished.append(item[0][0])
            if finished != sorted(finished):
                raise KeyboardInterrupt

    monkeypatch.setattr(certification, "run_pool", interrupted)
    with pytest.raises(KeyboardInterrupt):
        certify.main(common + ["--outfile", str(tmp_path / "log.tsv")])
    written = [int(row[0]) for row in _rows(tmp_path / "log.tsv")]
    assert written != sorted(written) and len(written) < 12  # (image 6 runs to N = 300, 7 stops at 157)
    monkeypatch.setattr(certification, "run_pool", real)
    certify.main(common + ["--outfile", str(tmp_path / "log.tsv"), "--resume"])
    assert _rows(tmp_path / "log.tsv") == _rows(tmp_path / "ref.tsv")


# ---------------------------------------------------------------------------------------------------------------
# Out of memory: a pass is retried in halves (an injected failure above a size)
# ---------------------------------------------------------------------------------------------------------------

CLASSIFIER_ONLY = [a if a != str(REPO / "models" / "digits_denoiser.pt") else "none" for a in DIGITS]


def _out_of_memory_above(monkeypatch, limit: int) -> list[int]:
    """Every forward pass of more than ``limit`` samples raises CUDA's out-of-memory error; returns the pass sizes."""
    sizes: list[int] = []
    real = core.Smooth.logits

    def logits(self, x_noisy, generators=None):
        sizes.append(len(x_noisy))
        if len(x_noisy) > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x_noisy)} MiB (injected)")
        return real(self, x_noisy, generators)

    monkeypatch.setattr(core.Smooth, "logits", logits)
    return sizes


@pytest.mark.parametrize("extra", [[], ["--no_pool"]])
def test_out_of_memory_halves_the_batch_and_changes_no_row(tmp_path, monkeypatch, capsys, extra):
    common = CLASSIFIER_ONLY + ["--sigma", "0.12", "--N", "300", "--max_images", "4", "--sequential", "--batch_size",
                                "64", *extra]  # (radii from 0.01 to 0.085, one image to n = 197)
    certify.main(common + ["--outfile", str(tmp_path / "ref.tsv")])
    freed: list[torch.device] = []
    monkeypatch.setattr("runkit.memory.free_cached_memory", lambda device, collect=True: freed.append(device))
    sizes = _out_of_memory_above(monkeypatch, 20)
    capsys.readouterr()
    certify.main(common + ["--outfile", str(tmp_path / "oom.tsv")])
    assert _rows(tmp_path / "oom.tsv") == _rows(tmp_path / "ref.tsv")
    failed = [b for b in sizes if b > 20]
    assert failed and len(freed) == len(failed)  # the memory freed before each retry
    assert all(b <= 20 for b in sizes[sizes.index(failed[-1]) + 1:])  # no pass larger than what fitted, after
    assert f"halved {len(failed)}x after running out of memory" in capsys.readouterr().out


def test_a_single_sample_that_does_not_fit_is_one_error_line(tmp_path, monkeypatch, cli_error):
    _out_of_memory_above(monkeypatch, 0)
    line = cli_error(certify.main, CLASSIFIER_ONLY + ["--sigma", "0.5", "--N", "50", "--max_images", "2",
                                                      "--outfile", str(tmp_path / "log.tsv")])
    assert line.startswith("error: cpu: out of memory even for a batch of 1 sample (CUDA out of memory. Tried to "
                           "allocate 1 MiB (injected))")
    assert Path(tmp_path / "log.tsv").read_text() == HEADER + "\n"  # no row


# ---------------------------------------------------------------------------------------------------------------
# --compile: one shape, one graph
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--no_pool"]])
def test_a_compiled_sequential_run_compiles_one_graph(tmp_path, monkeypatch, extra):
    """torch.compile(dynamic=False) compiles a graph for every new batch shape (and falls back to eager after 8);
    --sequential asks for a new number of samples at every checkpoint. Every forward pass is padded to the batch
    size (Smooth's fixed_batch): the classifier compiles one graph (counted by a counting backend in inductor's
    place: the graphs dynamo captures), and the rows are the eager run's."""
    from torch._dynamo.testing import CompileCounter

    counter, real = CompileCounter(), torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *args, **kwargs: real(self, backend=counter, dynamic=kwargs.get("dynamic")))
    torch._dynamo.reset()
    common = CLASSIFIER_ONLY + ["--sigma", "0.12", "--N", "300", "--max_images", "3", "--sequential",
                                "--batch_size", "64", *extra]
    compiled = certify.main(common + ["--compile", "--outfile", str(tmp_path / "compiled.tsv")])
    assert counter.frame_count == 1
    eager = certify.main(common + ["--outfile", str(tmp_path / "eager.tsv")])
    assert [(r.predict, r.n) for r in compiled] == [(r.predict, r.n) for r in eager]
    assert [r.radius for r in compiled] == pytest.approx([r.radius for r in eager], abs=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_auto_batch_size_finds_a_size_and_the_log_does_not_depend_on_it(tmp_path):
    """CUDA's default --batch_size auto: the sidecar records the size found (at most N), and the rows equal those of
    a run at another batch size without the pool (fp32, no TF32)."""
    common = [a if a != "cpu" else "cuda" for a in DIGITS] + ["--sigma", "0.25", "--N", "2000", "--max_images", "4",
                                                              "--sequential", "--tf32", "off"]
    certify.main(common + ["--outfile", str(tmp_path / "auto.tsv")])
    size = json.loads((tmp_path / "auto.tsv.json").read_text())["info"]["batch_size"]
    assert isinstance(size, int) and 16 <= size <= 2000
    certify.main(common + ["--batch_size", "37", "--no_pool", "--outfile", str(tmp_path / "b37.tsv")])
    assert _rows(tmp_path / "auto.tsv") == _rows(tmp_path / "b37.tsv")


@pytest.mark.cuda
def test_auto_batch_size_is_a_pass_that_fits_on_the_gpu(tmp_path):
    """The search on the real device (the default on CUDA): the size found is at most N, and a pass of it runs."""
    from runkit.memory import fits

    argv = [a if a != "cpu" else "cuda" for a in DIGITS] + ["--sigma", "0.25", "--N", "100000", "--outfile",
                                                            str(tmp_path / "x.tsv")]
    opts = certification.resolve_options(certification.RunOptions.from_namespace(
        certification.certify_parser().parse_args(argv)))
    assert opts.batch_size == "auto"
    device = torch.device("cuda")
    smoothed = certification.build_smoothed(opts, device)
    assert isinstance(opts.batch_size, int) and 16 <= opts.batch_size <= 100_000
    x = torch.zeros(3, 16, 16, device=device)
    stream = core.NoiseStream(x, 0, core.PHASE_ESTIMATION, smoothed.noise_block, opts.batch_size)
    assert fits(lambda b: smoothed.count_pass([core.SampleRange(stream, 0, b)], b), opts.batch_size, device)
    assert smoothed.passes == 1 and smoothed.fitting.halvings == 0  # (the search's own passes are not counted)
