"""certify.py: Cohen-format log, reproducibility (batch size, processes, resume), bad input, end to end on digits.

Tiny random models: a digits_vit_tiny with its patch embedding and head scaled up (so that its prediction under
noise is spread over several classes and every count depends on the exact noise) and a random digits denoiser.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import certify
import sequential
from runkit import devices, files
from runkit.cli import run_cli
from runkit.devices import torch_threads
from runkit.errors import UserError
from runkit.logs import HEADER, read_log

REPO = Path(__file__).resolve().parents[1]
BASE = ["--dataset", "digits", "--sigma", "0.25", "--N0", "10", "--N", "100", "--max_images", "12",
        "--device", "cpu", "--no_progress", "--seed", "3", "--precision", "fp32"]



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two threads are many times slower for these tiny models."""
    with torch_threads(1):
        yield

@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    from classifier import get_architecture
    from denoiser import build_denoiser

    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    clf = get_architecture("digits_vit_tiny", num_classes=10)
    with torch.no_grad():
        clf.model.patch_embed.proj.weight.mul_(5)
        clf.model.head.weight.mul_(5)
    torch.save(clf.model.state_dict(), folder / "clf.pt")
    torch.save(build_denoiser("digits").unet.state_dict(), folder / "den.pt")
    return {"clf": str(folder / "clf.pt"), "den": str(folder / "den.pt")}


def _args(models, outfile, *extra, batch_size=64):
    return BASE + ["--classifier_ckpt", models["clf"], "--denoiser_ckpt", "none", "--batch_size", str(batch_size),
                   "--outfile", str(outfile), *extra]


def _body(path: Path) -> list[list[str]]:
    """The log without the time column (the only column that may differ between equal runs)."""
    lines = Path(path).read_text().split("\n")
    assert lines[0] == HEADER and lines[-1] == ""
    return [line.split("\t")[:5] for line in lines[1:-1]]


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory) -> Path:
    """Single process, batch size 64, no denoiser."""
    out = tmp_path_factory.mktemp("ref") / "ref.tsv"
    rows = certify.main(_args(models, out))
    assert len(rows) == 12
    return out


def test_log_format(reference):
    body = _body(reference)
    assert [int(r[0]) for r in body] == list(range(12))
    predicts = [int(r[2]) for r in body]
    assert len(set(predicts)) >= 2, "the test model should not be constant"
    for _idx, label, predict, radius, correct in body:
        assert repr(float(radius)) == radius  # full precision
        assert int(correct) == int(predict == label)
        assert (float(radius) == 0.0) == (predict == "-1")
        assert float(radius) <= 0.25 * 3.1  # sigma * Phi^-1((alpha)^(1/N)) at most
    time_col = [float(line.split("\t")[5]) for line in reference.read_text().split("\n")[1:-1]]
    assert all(t > 0 for t in time_col)
    side = json.loads(reference.with_name("ref.tsv.json").read_text())
    assert side["config"]["N"] == 100 and side["config"]["sigma"] == 0.25 and side["config"]["seed"] == 3
    assert side["config"]["classifier"] == "clf.pt" and side["config"]["denoiser"] is None


def test_batch_size_does_not_change_the_log(models, reference, tmp_path):
    certify.main(_args(models, tmp_path / "b7.tsv", batch_size=7))
    assert _body(tmp_path / "b7.tsv") == _body(reference)
    certify.main(_args(models, tmp_path / "seed.tsv", "--seed", "4"))
    assert _body(tmp_path / "seed.tsv") != _body(reference)  # the log does depend on the seed


def test_resume_after_max_and_after_a_half_written_line(models, reference, tmp_path):
    out = tmp_path / "log.tsv"
    certify.main(_args(models, out, "--max_images", "5"))
    assert len(_body(out)) == 5
    certify.main(_args(models, out, "--resume", batch_size=7))
    assert _body(out) == _body(reference)
    # a run killed in the middle of writing row 8: keep rows 0..7 and half of row 8
    text = reference.read_text()
    cut = text.index("\n8\t") + 6
    out.write_text(text[:cut])
    certify.main(_args(models, out, "--resume"))
    assert _body(out) == _body(reference)
    before = out.read_text()
    assert certify.main(_args(models, out, "--resume")) is not None  # nothing left to do: unchanged
    assert out.read_text() == before


def test_resume_from_rank_parts(models, reference, tmp_path):
    """Parts left by an interrupted sharded run (each with a half-written line) are resumed and merged."""
    out = tmp_path / "log.tsv"
    shutil.copy(reference.with_name("ref.tsv.json"), tmp_path / "log.tsv.json")
    lines = reference.read_text().split("\n")[1:-1]
    (tmp_path / "log.tsv.rank0").write_text(HEADER + "\n" + "\n".join(lines[0:6:2]) + "\n" + lines[6][:3])
    (tmp_path / "log.tsv.rank1").write_text(HEADER + "\n" + lines[1] + "\n" + lines[3][:5])
    (tmp_path / "log.tsv.rank2").write_text(HEADER + "\n" + lines[5] + "\n")  # from a run with 3 processes
    certify.main(_args(models, out, "--resume"))
    assert _body(out) == _body(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.tsv", "log.tsv.json"]


def _torchrun(args, nproc=2, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "certify.py"), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)


@pytest.mark.slow
def test_two_processes_equal_one(models, reference, tmp_path):
    out = tmp_path / "log.tsv"
    proc = _torchrun(_args(models, out, batch_size=7))
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert _body(out) == _body(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.tsv", "log.tsv.json"]
    assert "12 images" in output


def _leave_as_killed(out: Path, world: int, keep: int) -> None:
    """Turn the complete log ``out`` of a ``world``-process run into what that run leaves when it is killed: no merged
    log, and rank r's part with its first ``keep`` rows (rank r certifies every world-th image) and a half-written
    next row."""
    header, *rows = out.read_text().split("\n")[:-1]
    for rank in range(world):
        mine = rows[rank::world]
        out.with_name(f"{out.name}.rank{rank}").write_text(
            "\n".join([header, *mine[:keep]]) + "\n" + mine[keep][: len(mine[keep]) // 2])
    out.unlink()


@pytest.mark.slow
def test_end_to_end_with_denoiser_interrupted_and_resumed(models, tmp_path, capsys):
    """The real digits denoiser architecture (random weights): a 2-process run equals the 1-process one; cut as a
    killed run leaves it (rank parts, each ending in a half-written row), it is resumed by one process."""
    args = ["--dataset", "digits", "--sigma", "0.5", "--N0", "10", "--N", "30", "--max_images", "10",
            "--device", "cpu", "--no_progress", "--classifier_ckpt", models["clf"], "--denoiser_ckpt", models["den"],
            "--precision", "fp32"]
    ref = tmp_path / "ref" / "log.tsv"
    certify.main(args + ["--outfile", str(ref), "--batch_size", "40"])
    assert json.loads(ref.with_name("log.tsv.json").read_text())["config"]["denoiser_ckpt"] == "den.pt"

    out = tmp_path / "run" / "log.tsv"
    proc = _torchrun(args + ["--outfile", str(out), "--batch_size", "7"])
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert _body(out) == _body(ref)

    _leave_as_killed(out, world=2, keep=2)
    parts = [out.with_name("log.tsv.rank0"), out.with_name("log.tsv.rank1")]
    assert [len(p.read_text().split("\n")) for p in parts] == [4, 4]  # header, 2 rows, a half row
    capsys.readouterr()
    certify.main(args + ["--outfile", str(out), "--batch_size", "16", "--resume"])
    assert "(6 certified in this run" in capsys.readouterr().out  # the 4 complete rows of the parts are kept
    assert _body(out) == _body(ref)
    assert not any(p.exists() for p in parts)


@pytest.mark.slow
def test_compile_gives_the_eager_log(tmp_path):
    """--compile (torch.compile of the UNet and the classifier, fast.compile_for_inference_) on the shipped, trained
    digits models: the same predictions and radii as the plain eager run on the same noise, and the sidecar records
    it."""
    args = ["--dataset", "digits", "--sigma", "0.25", "--N0", "10", "--N", "60", "--max_images", "3",
            "--device", "cpu", "--no_progress", "--batch_size", "10",  # one batch shape: one compilation each
            "--precision", "fp32"]
    eager = certify.main(args + ["--outfile", str(tmp_path / "eager.tsv")])
    compiled = certify.main(args + ["--outfile", str(tmp_path / "compiled.tsv"), "--compile"])
    assert [r.predict for r in compiled] == [r.predict for r in eager] and len(eager) == 3
    assert [r.radius for r in compiled] == pytest.approx([r.radius for r in eager], abs=1e-9)
    assert json.loads((tmp_path / "compiled.tsv.json").read_text())["info"]["compile"] is True
    import torch._inductor.config as inductor_config
    assert inductor_config.freezing is False  # weight freezing was an option of these compilations only


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear UserError, nothing created or changed
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--sigma", "0"], "--sigma"),
    (["--sigma", "-0.5"], "--sigma"),
    (["--sigma", "nan"], "--sigma"),
    (["--N0", "0"], "--N0"),
    (["--N", "-5"], "--N"),
    (["--batch_size", "0"], "--batch_size"),
    (["--alpha", "0"], "--alpha"),
    (["--alpha", "1"], "--alpha"),
    (["--alpha", "1.5"], "--alpha"),
    (["--skip", "0"], "--skip"),
    (["--seed", "-1"], "--seed"),
    (["--classifier_ckpt", "/nonexistent/clf.pt"], "/nonexistent/clf.pt"),
    (["--finetuned_path", "/nonexistent/ft.pt"], "/nonexistent/ft.pt"),
    (["--denoiser_ckpt", "/nonexistent/den.pt"], "/nonexistent/den.pt"),
    (["--dataset", "mnist"], "mnist"),
    (["--dataset", "cifar10", "--data_dir", "/nonexistent/cifar"], "CIFAR-10"),
    (["--resume", "--overwrite"], "--resume"),
    (["--off-the-shelf", "--finetuned_path", "x.pt"], "--off-the-shelf"),
    (["--radii", "0.5"], "--radii"),
    (["--sequential", "--radii", "-0.5"], "--radii"),
    (["--sequential", "--radii", "nan"], "--radii"),
])
def test_bad_input(models, tmp_path, extra, message):
    out = tmp_path / "sub" / "log.tsv"
    with pytest.raises(UserError, match=message.replace("+", r"\+")):
        certify.main(_args(models, out) + extra)
    assert list(tmp_path.iterdir()) == []


def test_wrong_checkpoint_is_a_clear_error(models, tmp_path):
    out = tmp_path / "log.tsv"
    with pytest.raises(UserError, match="clf.pt"):  # the classifier's file given as the denoiser
        certify.main(_args(models, out) + ["--denoiser_ckpt", models["clf"]])
    with pytest.raises(UserError, match="den.pt"):  # and the denoiser's as the classifier
        certify.main(_args(models, out) + ["--classifier_ckpt", models["den"]])
    assert list(tmp_path.iterdir()) == []


def test_existing_outfile_and_resume_mismatch(models, reference, tmp_path, capsys):
    out = tmp_path / "log.tsv"
    shutil.copy(reference, out)
    shutil.copy(reference.with_name("ref.tsv.json"), tmp_path / "log.tsv.json")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def unchanged():
        return {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    with pytest.raises(UserError, match="already exists.*--resume.*--overwrite"):
        certify.main(_args(models, out))
    assert unchanged()
    with pytest.raises(SystemExit) as exit_info:  # the CLI: one line, exit status 2
        run_cli(certify.main, _args(models, out))
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: --outfile")
    for extra, key in ((["--sigma", "0.5"], "sigma=0.25"), (["--N", "200"], "N=100"), (["--seed", "0"], "seed=3"),
                       (["--precision", "bf16"], "precision"), (["--noise_block", "64"], "noise_block")):
        with pytest.raises(UserError, match=f"different configuration.*{key}"):
            certify.main(_args(models, out, "--resume", *extra))
        assert unchanged()
    (tmp_path / "log.tsv.json").unlink()
    with pytest.raises(UserError, match="no configuration file"):
        certify.main(_args(models, out, "--resume"))
    shutil.copy(reference.with_name("ref.tsv.json"), tmp_path / "log.tsv.json")
    out.write_text(reference.read_text().replace("\n3\t", "\nthree\t"))
    with pytest.raises(UserError, match="line 5"):
        certify.main(_args(models, out, "--resume"))
    # --overwrite replaces the log and its configuration
    certify.main(_args(models, out, "--overwrite", "--seed", "4"))
    assert json.loads((tmp_path / "log.tsv.json").read_text())["config"]["seed"] == 4
    assert _body(out) != _body(reference)


# ---------------------------------------------------------------------------------------------------------------
# The paper's settings: subset, input convention, multi-step denoising
# ---------------------------------------------------------------------------------------------------------------


def test_subset_paper_and_skip(models, reference, tmp_path):
    """--subset paper certifies datasets.paper_imagenet_subset(targets, --seed) (the ImageNet default); an explicit
    --skip means --subset skip; the sidecar records the subset and the input convention."""
    from certification import RunOptions, resolve_options
    from datasets import get_dataset, paper_imagenet_subset
    side = json.loads(reference.with_name("ref.tsv.json").read_text())["config"]
    assert (side["subset"], side["skip"], side["input_norm"], side["multistep"]) == ("skip", 1, "model", False)
    rows = certify.main(_args(models, tmp_path / "paper.tsv", "--subset", "paper", "--max_images", "4"))
    test_set = get_dataset("digits", "test")
    assert [r.idx for r in rows] == sorted(paper_imagenet_subset(test_set.targets, 3, 10)[:4])  # the log: idx order
    assert sorted(r.label for r in rows) == [0, 1, 2, 3]  # one image of each of the first four classes

    def resolved(*extra):
        args = certify.get_parser().parse_args(["--dataset", "imagenet", "--sigma", "0.5", "--outfile",
                                                str(tmp_path / "in.tsv"), "--denoiser_ckpt", "none", *extra])
        opts = resolve_options(RunOptions.from_namespace(args))
        return opts.subset, opts.skip, opts.input_norm
    assert resolved() == ("paper", None, "paper")
    assert resolved("--skip", "50") == ("skip", 50, "paper")
    assert resolved("--subset", "skip", "--input_norm", "model") == ("skip", 50, "model")
    with pytest.raises(UserError, match="--skip 50 contradicts --subset paper"):
        resolved("--subset", "paper", "--skip", "50")


def test_input_norm_from_the_checkpoint_and_a_contradicting_flag(models, tmp_path):
    clf = torch.load(models["clf"], weights_only=True)
    torch.save({"state_dict": clf, "arch": "digits_vit_tiny", "input_norm": "paper", "args": {}}, tmp_path / "ft.pt")
    out = tmp_path / "log.tsv"
    certify.main(_args(models, out, "--finetuned_path", str(tmp_path / "ft.pt"), "--max_images", "2"))
    assert json.loads(out.with_name("log.tsv.json").read_text())["config"]["input_norm"] == "paper"
    with pytest.raises(UserError, match="--input_norm model contradicts .*ft.pt"):
        certify.main(_args(models, tmp_path / "other.tsv", "--finetuned_path", str(tmp_path / "ft.pt"),
                           "--input_norm", "model"))


def test_finetuned_path_takes_a_checkpoint_of_the_papers_code(models, reference, tmp_path):
    """A checkpoint as the paper's train.py writes it (epoch, arch, optimizer, state_dict under classifier.) certifies
    as the same weights do (digits: mean = std = 0.5, so its recorded 'paper' input is the same input)."""
    clf = torch.load(models["clf"], weights_only=True)
    paper = {"epoch": 30, "arch": "digits_vit_tiny", "optimizer": {"state": {}, "param_groups": []},
             "state_dict": {"classifier." + k: v for k, v in clf.items()}}
    torch.save(paper, tmp_path / "checkpoint-30.pth.tar")
    out = tmp_path / "log.tsv"
    certify.main(BASE + ["--finetuned_path", str(tmp_path / "checkpoint-30.pth.tar"), "--denoiser_ckpt", "none",
                         "--batch_size", "64", "--outfile", str(out)])
    assert _body(out) == _body(reference)
    assert json.loads(out.with_name("log.tsv.json").read_text())["config"]["input_norm"] == "paper"


@pytest.mark.slow
def test_multistep_log_does_not_depend_on_the_batch_size(models, tmp_path):
    """--multistep: the whole reverse chain (t* = 28 at sigma 0.01 for the digits schedule); each sample's chain noise
    is seeded per sample, so the log is the same for any --batch_size; it differs from the one-shot log."""
    args = ["--dataset", "digits", "--sigma", "0.01", "--N0", "6", "--N", "14", "--max_images", "2", "--device",
            "cpu", "--no_progress", "--classifier_ckpt", models["clf"], "--denoiser_ckpt", models["den"],
            "--precision", "fp32"]
    logs = {b: certify.main(args + ["--multistep", "--batch_size", str(b), "--outfile", str(tmp_path / f"m{b}.tsv")])
            for b in (5, 20)}
    assert [(r.predict, r.radius) for r in logs[5]] == [(r.predict, r.radius) for r in logs[20]]
    assert json.loads((tmp_path / "m5.tsv.json").read_text())["config"]["multistep"] is True
    with pytest.raises(UserError, match="--multistep needs a denoiser"):
        certify.main(_args(models, tmp_path / "x.tsv", "--multistep"))


# ---------------------------------------------------------------------------------------------------------------
# --sequential, --skip_wrong, several classifiers, on the digits models (fp32)
# ---------------------------------------------------------------------------------------------------------------

DIGITS = ["--dataset", "digits", "--device", "cpu", "--no_progress", "--seed", "2", "--N0", "10",
          "--precision", "fp32", "--denoiser_ckpt", str(REPO / "models" / "digits_denoiser.pt")]
OFF_THE_SHELF = ["--classifier_ckpt", str(REPO / "models" / "digits_vit_tiny.pt")]


def _rows(path: Path) -> list[list[str]]:
    """Every column but the time."""
    lines = Path(path).read_text().split("\n")
    names = lines[0].split("\t")
    return [[v for name, v in zip(names, line.split("\t")) if name != "time"] for line in lines[1:-1]]


def test_sequential_log_has_n_and_the_sidecar_records_mode_and_radii(tmp_path):
    out = tmp_path / "seq.tsv"
    rows = certify.main(DIGITS + OFF_THE_SHELF + ["--sigma", "0.5", "--N", "300", "--max_images", "3",
                                                  "--sequential", "--outfile", str(out)])
    assert out.read_text().split("\n")[0] == HEADER + "\tn"
    assert all(r.n in sequential.checkpoint_schedule(300) for r in rows)
    config = json.loads(out.with_name("seq.tsv.json").read_text())["config"]
    # default radii: 0 and the table radii that 300 samples can certify at sigma 0.5 (0.5 Phi^-1(0.0005^(1/300)) = 0.98)
    assert config["mode"] == "sequential" and config["radii"] == [0.0, 0.25, 0.5, 0.75]
    df = read_log(out)
    assert list(df["n"]) == [r.n for r in rows]
    with pytest.raises(UserError, match="mode"):  # resuming it as a fixed-N run is refused
        certify.main(DIGITS + OFF_THE_SHELF + ["--sigma", "0.5", "--N", "300", "--max_images", "3", "--resume",
                                               "--outfile", str(out)])


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--sequential", "--radii", "0", "0.25", "0.5"]])
def test_skip_wrong_same_accuracy_and_acr_fewer_samples(tmp_path, mode):
    import analysis

    common = DIGITS + OFF_THE_SHELF + ["--sigma", "1.0", "--N", "100", "--max_images", "10", *mode]
    certify.main(common + ["--outfile", str(tmp_path / "full.tsv")])
    certify.main(common + ["--skip_wrong", "--outfile", str(tmp_path / "skip.tsv")])
    full, skip = read_log(tmp_path / "full.tsv"), read_log(tmp_path / "skip.tsv")
    wrong = skip["n"] == 0
    assert wrong.sum() >= 1, "the test needs images whose selection guess is wrong"
    assert (full["correct"] == skip["correct"]).all() and not skip["correct"][wrong].any()
    assert (full["radius"][skip["correct"]] == skip["radius"][skip["correct"]]).all()
    radii = analysis.radius_grid(0, 2, 0.25)
    assert (analysis.certified_accuracy(full, radii) == analysis.certified_accuracy(skip, radii)).all()
    assert analysis.acr(full) == analysis.acr(skip)
    assert analysis.clean_accuracy(full) == analysis.clean_accuracy(skip)
    assert skip["n"].sum() < (full["n"].sum() if "n" in full else 100 * len(full))


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--sequential", "--radii", "0", "0.25", "0.5"]])
def test_several_classifiers_one_denoising_pass_equal_single_runs(models, tmp_path, mode):
    common = DIGITS + ["--sigma", "0.5", "--N", "150", "--max_images", "4", "--batch_size", "64", *mode]
    logs = certify.main(common + OFF_THE_SHELF + ["--off-the-shelf", "--finetuned_path", models["clf"],
                                                  "--outfile", str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv")])
    assert len(logs) == 2
    certify.main(common + OFF_THE_SHELF + ["--outfile", str(tmp_path / "a1.tsv")])
    certify.main(common + ["--finetuned_path", models["clf"], "--outfile", str(tmp_path / "b1.tsv")])
    assert _rows(tmp_path / "a.tsv") == _rows(tmp_path / "a1.tsv")
    assert _rows(tmp_path / "b.tsv") == _rows(tmp_path / "b1.tsv")
    assert _rows(tmp_path / "a.tsv") != _rows(tmp_path / "b.tsv")
    side = json.loads((tmp_path / "b.tsv.json").read_text())["config"]
    assert side["classifier"] == "clf.pt" and side["finetuned"] is True
    # resuming: log a complete, log b cut after two rows; only b's missing rows are written
    a_before = (tmp_path / "a.tsv").read_text()
    lines = (tmp_path / "b.tsv").read_text().split("\n")
    (tmp_path / "b.tsv").write_text("\n".join(lines[:3]) + "\n")
    certify.main(common + OFF_THE_SHELF + ["--off-the-shelf", "--finetuned_path", models["clf"], "--resume",
                                           "--outfile", str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv")])
    assert (tmp_path / "a.tsv").read_text() == a_before
    assert _rows(tmp_path / "b.tsv") == _rows(tmp_path / "b1.tsv")


# ---------------------------------------------------------------------------------------------------------------
# Reliability: locks, content-checked resume, faults (real second processes)
# ---------------------------------------------------------------------------------------------------------------


def _cli(args, **kwargs) -> subprocess.Popen:
    """certify.py as its own process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, str(REPO / "certify.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)


def _complete_rows(paths) -> int:
    """Rows written so far to the files among ``paths`` that exist (header excluded)."""
    return sum(max(p.read_text().count("\n") - 1, 0) for p in paths if p.exists())


def _signal_tree(pid: int, sig: int) -> list[int]:
    """Send ``sig`` to process ``pid`` and all its descendants (torchrun's workers run in sessions of their own, so
    a process group does not reach them; a scheduler kills them all, e.g. by cgroup)."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat_file.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)
    return tree


def _stop_tree(pid: int, timeout: float = 30) -> None:
    """SIGSTOP process ``pid`` and its descendants and wait until each is stopped: a signal is delivered
    asynchronously, and a process still running could finish one more row after kill() returns."""
    tree = _signal_tree(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    for p in tree:
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                break  # gone
            if state in ("T", "t", "Z", "X"):
                break
            time.sleep(0.005)


def _wait_rows(paths, count: int, proc: subprocess.Popen, timeout: float = 240) -> int:
    """Wait until ``paths`` hold ``count`` complete rows (or the process ends); return the number of rows."""
    deadline = time.monotonic() + timeout
    while _complete_rows(paths) < count and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return _complete_rows(paths)


@pytest.mark.slow
@pytest.mark.parametrize("first", ["fresh", "resume", "torchrun"])
def test_a_second_run_on_a_running_log_is_refused(models, reference, tmp_path, cli_error, files_of, first):
    """Two runs on one outfile (two fresh runs, a requeued --resume while another --resume runs, a --resume while a
    torchrun job writes its parts): the second fails at once naming the first, changes nothing, and the first
    completes with exactly the uninterrupted log."""
    out = tmp_path / "log.tsv"
    if first != "fresh":
        certify.main(_args(models, out, "--max_images", "3"))
    extra = () if first == "fresh" else ("--resume",)
    proc = (_torchrun(_args(models, out, *extra)) if first == "torchrun"
            else _cli(_args(models, out, *extra)))
    try:
        paths = [out] + [out.with_name(f"log.tsv.rank{r}") for r in range(2)]
        assert _wait_rows(paths, 4, proc) >= 4 and proc.poll() is None, proc.communicate()[0]
        _stop_tree(proc.pid)  # hold it mid-run
        before = files_of(tmp_path)
        for second in (_args(models, out, "--resume"), _args(models, out), _args(models, out, "--overwrite")):
            line = cli_error(certify.main, second)
            assert f"--outfile {out} is in use by pid" in line and "certify.py" in line, line
        assert files_of(tmp_path) == before
    finally:
        _signal_tree(proc.pid, signal.SIGCONT)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert _body(out) == _body(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.tsv", "log.tsv.json"]  # lock file gone too


def test_resume_refuses_other_checkpoint_content_under_the_same_name(models, tmp_path, cli_error, files_of):
    out = tmp_path / "log.tsv"
    den = tmp_path / "models" / "den.pt"
    den.parent.mkdir()
    shutil.copy(models["den"], den)
    args = ["--dataset", "digits", "--sigma", "0.5", "--N0", "10", "--N", "20", "--max_images", "2", "--device",
            "cpu", "--no_progress", "--denoiser_ckpt", str(den), "--outfile", str(out)]
    clf = tmp_path / "other" / "clf.pt"  # another model saved under the same file name
    clf.parent.mkdir()
    state = torch.load(models["clf"])
    torch.save({k: v + 0.01 for k, v in state.items()}, clf)
    certify.main(args + ["--classifier_ckpt", models["clf"]])
    side = json.loads(out.with_name("log.tsv.json").read_text())["config"]
    assert side["classifier"] == "clf.pt"
    assert side["fingerprints"]["classifier"].startswith(f"{os.path.getsize(models['clf'])}:")
    before = files_of(tmp_path)
    line = cli_error(certify.main, args + ["--classifier_ckpt", clf, "--resume", "--max_images", "3"])
    assert f"--classifier_ckpt {clf}: not the file the log {out} was written with" in line
    assert files_of(tmp_path) == before
    from denoiser import build_denoiser
    torch.manual_seed(1)
    torch.save(build_denoiser("digits").unet.state_dict(), den)  # the denoiser file replaced by another one
    before = files_of(tmp_path)
    line = cli_error(certify.main, args + ["--classifier_ckpt", models["clf"], "--resume", "--max_images", "3"])
    assert f"--denoiser_ckpt {den}: not the file the log {out} was written with" in line
    assert files_of(tmp_path) == before


MISSING_DEVICES = [kind for kind, present in (("mps", torch.backends.mps.is_available()),
                                              ("xpu", hasattr(torch, "xpu") and torch.xpu.is_available()),
                                              ("cuda", torch.cuda.is_available())) if not present]


@pytest.mark.parametrize("extra, message", [
    (["--device", "meta"], r"--device meta: not a device this program runs on"),
    *[(["--device", kind], rf"--device {kind}: {kind.upper()} is not available") for kind in MISSING_DEVICES],
    (["--outfile", "{file}/log.tsv"], r"--outfile .*file\.txt/log\.tsv: .*file\.txt is a file, not a folder"),
    (["--alpha", "nan"], r"--alpha nan: must be a finite number > 0 and < 1"),
    (["--precision", "fp64"], r"invalid choice"),
])
def test_bad_devices_and_outputs_fail_before_work(models, tmp_path, cli_error, files_of, extra, message, capsys):
    (tmp_path / "file.txt").write_text("x")
    before = files_of(tmp_path)
    argv = _args(models, tmp_path / "sub" / "log.tsv") + [e.format(file=tmp_path / "file.txt") for e in extra]
    if message == "invalid choice":  # argparse's own error (exit 2, usage line)
        with pytest.raises(SystemExit) as exc:
            certify.main(argv)
        assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    else:
        assert re.search(message, cli_error(certify.main, argv))
    assert files_of(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_files_follow_the_umask_and_auto_precision_is_recorded(models, tmp_path):
    old = os.umask(0o027)
    try:
        certify.main(_args(models, tmp_path / "log.tsv", "--max_images", "2"))
    finally:
        os.umask(old)
    for name in ("log.tsv", "log.tsv.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name
    args = _args(models, tmp_path / "auto.tsv", "--max_images", "1")
    args[args.index("--precision") + 1] = "auto"
    certify.main(args)
    recorded = json.loads((tmp_path / "auto.tsv.json").read_text())["config"]["precision"]
    assert recorded == devices.resolve_precision("auto", torch.device("cpu")) and recorded in ("bf16", "fp32")


def test_checkpoint_errors_name_the_flag_given_and_never_run_a_pickle(models, tmp_path, cli_error, pickle_payload):
    payload, marker = pickle_payload
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": payload}}, evil)
    for flag in ("--finetuned_path", "--classifier_ckpt"):
        line = cli_error(certify.main, _args(models, tmp_path / "log.tsv") + [flag, evil])
        assert line.startswith(f"error: {flag} {evil}: unreadable checkpoint (refused: it holds pickled Python"), line
        assert "weights_only=False" not in line and "weights_only` set to `False" not in line
    line = cli_error(certify.main, _args(models, tmp_path / "log.tsv") + ["--finetuned_path", models["den"]])
    assert line.startswith(f"error: --finetuned_path {models['den']}"), line
    assert not marker.exists() and not (tmp_path / "log.tsv").exists()


def _kill(proc: subprocess.Popen, sig: int) -> None:
    """SIGKILL: every process of the job (as a scheduler kills it); SIGTERM: the launcher only (torchrun forwards it
    to its workers)."""
    if proc.poll() is None:
        _signal_tree(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
    proc.communicate(timeout=120)


@pytest.mark.slow
def test_killed_at_random_points_and_resumed_gives_the_uninterrupted_log(models, tmp_path):
    """A requeued job's life: single-process and 2-process torchrun runs, each started with --resume (as job scripts
    do) and killed (kill -9 of the whole job, or SIGTERM) after a random number of new rows (0: at a random moment
    of the start-up); the final resumed log equals the uninterrupted one. FT_CADIS_FAULT_SEED replays a sequence."""
    seed = int(os.environ.get("FT_CADIS_FAULT_SEED", random.randrange(2**31)))
    rng = random.Random(seed)
    # 4 kills, each after at most 4 new rows (plus the rows finished while the signal travels): 32 images always
    # leave work for the last resume
    extra = ["--max_images", "32", "--N", "300"]
    certify.main(_args(models, tmp_path / "ref" / "log.tsv", *extra))
    out = tmp_path / "run" / "log.tsv"
    args = _args(models, out, *extra, "--resume")
    paths = [out] + [out.with_name(f"log.tsv.rank{r}") for r in range(2)]
    trace = [f"FT_CADIS_FAULT_SEED={seed}"]
    for launcher, sig in [(_cli, signal.SIGKILL), (_torchrun, signal.SIGKILL), (_cli, signal.SIGTERM),
                          (_torchrun, signal.SIGTERM)]:
        start = _complete_rows(paths)
        target = start + rng.randint(0, 4)
        proc = launcher(args)
        if target == start:  # a random moment of the start-up: before the first new row
            _wait_rows(paths, start + 1, proc, timeout=rng.uniform(0.0, 4.0))
        else:
            _wait_rows(paths, target, proc)
        _kill(proc, sig)
        trace.append(f"{launcher.__name__} {signal.Signals(sig).name} at {target}: {_complete_rows(paths)} rows")
    assert _complete_rows(paths) < 32, trace  # the last resume has work left
    certify.main(args)
    assert _body(out) == _body(tmp_path / "ref" / "log.tsv"), trace
    assert sorted(p.name for p in out.parent.iterdir()) == ["log.tsv", "log.tsv.json"], trace


# ---------------------------------------------------------------------------------------------------------------
# Shards (--shard K/S, Slurm arrays) and --merge
# ---------------------------------------------------------------------------------------------------------------


def _run_shards(models, out, count=3, extra=()):
    for k in range(count):
        certify.main(_args(models, out, "--shard", f"{k}/{count}", *extra))


def test_shards_run_separately_merge_into_the_one_process_log(models, reference, tmp_path, capsys):
    """Shards 0/3, 1/3, 2/3 (shard 1 interrupted mid-row and resumed) merge into the one-process log."""
    out = tmp_path / "log.tsv"
    _run_shards(models, out)
    shard1 = tmp_path / "log.tsv.shard1of3"
    assert [row[0] for row in _body(shard1)] == ["1", "4", "7", "10"]  # every 3rd selected image from the 2nd
    text = shard1.read_text()
    shard1.write_text(text[:text.index("\n4\t") + 5])  # killed while writing its second row
    certify.main(_args(models, out, "--shard", "1/3", "--resume"))
    assert _body(shard1)[0][0] == "1" and len(_body(shard1)) == 4
    rows = certify.main(["--merge", str(out)])
    assert _body(out) == _body(reference) and [r.idx for r in rows] == list(range(12))
    side = json.loads((tmp_path / "log.tsv.json").read_text())
    assert side["config"]["seed"] == 3 and side["config"]["shard"] is None
    assert side["info"]["merged_from"] == [f"log.tsv.shard{k}of3" for k in range(3)]
    assert "12 images" in capsys.readouterr().out
    assert certify.main(["--merge", str(out)]) == rows  # merging again changes nothing


def test_merge_refuses_missing_foreign_and_mixed_shards(models, tmp_path):
    out = tmp_path / "log.tsv"
    _run_shards(models, out)
    shard2, side2 = tmp_path / "log.tsv.shard2of3", tmp_path / "log.tsv.shard2of3.json"
    saved = shard2.read_text(), side2.read_text()
    shard2.unlink()
    side2.unlink()
    with pytest.raises(UserError, match=r"no log for shard 2/3 .*missing idx: 2, 5, 8, 11$"):
        certify.main(["--merge", str(out)])
    certify.main(_args(models, out, "--shard", "2/3", "--seed", "4"))  # a foreign part: another seed
    with pytest.raises(UserError, match=r"log.tsv.shard2of3 has a different configuration: seed=4 \(the others 3\).*"
                                        r"missing idx: 2, 5, 8, 11$"):
        certify.main(["--merge", str(out)])
    shard2.write_text(saved[0][:saved[0].index("\n8\t")] + "\n")  # an incomplete shard (and its right sidecar)
    side2.write_text(saved[1])
    with pytest.raises(UserError, match=r"shard2of3 is incomplete \(2 of 4 images.*--shard 2/3 --resume\).*"
                                        r"missing idx: 8, 11$"):
        certify.main(["--merge", str(out)])
    shard2.write_text(saved[0])
    certify.main(_args(models, out, "--shard", "0/2"))  # a shard of another split beside them
    with pytest.raises(UserError, match="2 different splits"):
        certify.main(["--merge", str(out)])
    assert not out.exists()
    with pytest.raises(UserError, match="give it alone"):
        certify.main(["--merge", str(out), "--seed", "3"])
    with pytest.raises(UserError, match="no shard logs"):
        certify.main(["--merge", str(tmp_path / "other.tsv")])


def test_an_unwritable_outfile_folder_is_an_error_before_the_models_load(models, tmp_path, cli_error, monkeypatch):
    """(As root every folder is writable, so the permission is denied by a stand-in for os.access.)"""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    line = cli_error(certify.main, _args(models, ro / "log.tsv"))
    assert f"--outfile {ro / 'log.tsv'}: cannot create files in {ro} (permission denied)" in line
    assert list(ro.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# GPU settings and device models: --dist_timeout, --tf32, --cudnn_benchmark, resume and merge across devices
# ---------------------------------------------------------------------------------------------------------------

A100 = {"type": "cuda", "name": "NVIDIA A100-SXM4-80GB", "sm_count": 108, "capability": "8.0"}
H100 = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "sm_count": 132, "capability": "9.0"}


def _doctor_info(log: Path, **info) -> None:
    """Change entries of the info a log's sidecar records (as a run on another device would have written them)."""
    side = log.with_name(log.name + ".json")
    recorded = json.loads(side.read_text())
    recorded["info"].update(info)
    side.write_text(json.dumps(recorded))


def test_gpu_settings_reach_the_run_and_the_sidecar(models, tmp_path, monkeypatch, cli_error):
    import certification
    import predict

    seen = []
    real_init, real_math = certification.init_distributed, certification.cuda_math
    monkeypatch.setattr(certification, "init_distributed", lambda *a: seen.append(("init", *a)) or real_init(*a))
    monkeypatch.setattr(certification, "cuda_math", lambda *a: seen.append(("math", *a)) or real_math(*a))
    out = tmp_path / "log.tsv"
    certify.main(_args(models, out, "--max_images", "2", "--dist_timeout", "7", "--tf32", "off", "--cudnn_benchmark"))
    assert seen == [("init", "cpu", 7.0), ("math", "off", True)]
    recorded = json.loads((tmp_path / "log.tsv.json").read_text())
    assert recorded["config"]["tf32"] == "off" and recorded["info"]["cudnn_benchmark"] is True
    assert recorded["info"]["device_models"] == [devices.device_model(torch.device("cpu"))]
    line = cli_error(certify.main, _args(models, out, "--resume"))  # --tf32 is part of the configuration
    assert "tf32='off' (now 'conv')" in line
    seen.clear()
    predict.main(["--dataset", "digits", "--sigma", "0.25", "--N", "20", "--max_images", "1", "--device", "cpu",
                  "--no_progress", "--precision", "fp32", "--classifier_ckpt", models["clf"], "--denoiser_ckpt", "none",
                  "--outfile", str(tmp_path / "p.tsv"), "--dist_timeout", "0.5"])
    assert seen == [("init", "cpu", 0.5), ("math", "conv", False)]
    assert "--dist_timeout 0.0: must be a finite number > 0" in cli_error(
        certify.main, _args(models, tmp_path / "x.tsv", "--dist_timeout", "0"))
    assert "--override seed: seed cannot be overridden; choose from device" in cli_error(
        certify.main, _args(models, tmp_path / "x.tsv", "--override", "seed"))


def test_resume_across_device_models_needs_override_device(models, reference, tmp_path, monkeypatch, cli_error,
                                                           files_of):
    import certification

    out = tmp_path / "log.tsv"
    certify.main(_args(models, out, "--max_images", "5"))
    _doctor_info(out, device_models=[A100])
    before = files_of(tmp_path)
    line = cli_error(certify.main, _args(models, out, "--resume"))
    assert f"--resume: {out} was written on cuda NVIDIA A100-SXM4-80GB (108 SMs), this run is on cpu" in line
    assert "CPU and CUDA generators" in line and "--override device" in line and "certificates valid" in line
    monkeypatch.setattr(certification, "device_model", lambda device: H100)  # as on an H100
    line = cli_error(certify.main, _args(models, out, "--resume"))
    assert "this run is on cuda NVIDIA H100 80GB HBM3 (132 SMs)" in line and "SM count" in line
    assert files_of(tmp_path) == before
    certify.main(_args(models, out, "--resume", "--override", "device"))
    assert _body(out) == _body(reference)
    assert json.loads((tmp_path / "log.tsv.json").read_text())["info"]["device_models"] == [A100, H100]
    old = tmp_path / "old.tsv"  # a sidecar of an older version: the device only
    certify.main(_args(models, old, "--max_images", "5"))
    _doctor_info(old, device="cuda:0", device_models=None)
    side = json.loads((tmp_path / "old.tsv.json").read_text())
    del side["info"]["device_models"]
    (tmp_path / "old.tsv.json").write_text(json.dumps(side))
    monkeypatch.undo()
    assert "written on cuda, this run is on cpu" in cli_error(certify.main, _args(models, old, "--resume"))


def test_merge_across_device_models_needs_override_device(models, reference, tmp_path, cli_error):
    out = tmp_path / "log.tsv"
    _run_shards(models, out)
    _doctor_info(tmp_path / "log.tsv.shard1of3", device_models=[A100])
    cpu = devices.device_model(torch.device("cpu"))
    line = cli_error(certify.main, ["--merge", out])
    assert (f"log.tsv.shard1of3 ran on cuda NVIDIA A100-SXM4-80GB (108 SMs), log.tsv.shard0of3 on "
            f"{devices.describe_device_model(cpu)} (the CPU and CUDA generators") in line
    assert "--override device" in line and line.endswith("missing idx: 1, 4, 7, 10") and not out.exists()
    assert "cannot be overridden" in cli_error(certify.main, ["--merge", out, "--override", "seed"])
    rows = certify.main(["--merge", str(out), "--override", "device"])
    assert [r.idx for r in rows] == list(range(12)) and _body(out) == _body(reference)
    assert json.loads((tmp_path / "log.tsv.json").read_text())["info"]["device_models"] == [cpu, A100]


@pytest.mark.cuda
def test_on_a_gpu_the_sidecar_records_its_model_and_tf32(models, tmp_path):
    out = tmp_path / "log.tsv"
    certify.main(_args(models, out, "--max_images", "3", "--device", "cuda", "--tf32", "off"))
    recorded = json.loads((tmp_path / "log.tsv.json").read_text())
    props = torch.cuda.get_device_properties(torch.device("cuda"))
    [model] = recorded["info"]["device_models"]
    assert (model["type"], model["name"], model["sm_count"]) == ("cuda", props.name, props.multi_processor_count)
    assert recorded["config"]["tf32"] == "off" and recorded["info"]["device"] == "cuda:0"
    certify.main(_args(models, out, "--max_images", "4", "--device", "cuda", "--tf32", "off", "--resume"))
    assert len(_body(out)) == 4
