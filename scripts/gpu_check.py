"""The first thing to run on a GPU machine: what only a GPU can show, in one report, ``DIR/gpu_check.md``.

Sections (each PASS, FAIL or measured, with the commands it ran and its seconds):

1. the ``cuda`` tests (``pytest -m cuda``: device models, TF32, torchrun's GPU per rank and timeout);
2. fp16 fine-tuning on the digits data, stopped and resumed: the resumed run's step log and weights must equal an
   uninterrupted run's;
3. certify parity on digits: two batch sizes must give the same log; fp32 with ``--tf32 off`` (exact) against the
   default ``--tf32 conv`` and against ``--precision auto``: how many predictions agree, the largest radius change;
4. ``bench.py`` on the cifar10 and imagenet configurations (random weights): fp32 (``--tf32 off``), TF32, bf16,
   fp16, compiled, ``--batch_size auto``;
5. the ImageNet f o D's memory per sample (the peak's growth from batch 8 to 16) and the batch that would fill the
   GPU;
6. host syncs in the certify and train loops, counted under ``torch.cuda.set_sync_debug_mode('warn')``.

Sizes are chosen for about 9 minutes on one GPU (unmeasured: no GPU was available when this was written; each
section's seconds are in the report). ``--device cpu`` runs sections 2-4 at sizes for a few minutes on 2 cores
(the others are n/a) and is what the test suite checks. The exit status is 1 when a section failed.

    bash scripts/gpu_check.sh                      # -> runs/gpu_check/gpu_check.md
    bash scripts/gpu_check.sh --device cpu --outdir /tmp/gpu_check
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import training  # noqa: E402
from certification import RunOptions, certify_parser, resolve_options, run_certify  # noqa: E402
from runkit.cli import flags_given, run_cli  # noqa: E402
from runkit.devices import DEFAULT_TF32, device_model, native_bf16, resolve_device  # noqa: E402
from runkit.files import atomic_write_text  # noqa: E402

NA_CPU = "n/a (cpu)"


@dataclasses.dataclass
class Check:
    """Where the check runs and what it has written so far."""

    device: torch.device
    outdir: Path
    lines: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)

    @property
    def cpu(self) -> bool:
        return self.device.type != "cuda"

    def write(self) -> None:
        atomic_write_text(self.outdir / "gpu_check.md", "\n".join(self.lines) + "\n")


def _command(script: str, argv: Sequence[str]) -> str:
    return "    python " + " ".join(shlex.quote(str(a)) for a in [script, *argv])


def _train(argv: list[str]) -> dict[str, Any]:
    """train.py's run, in this process (one start-up for the whole check)."""
    parser = argparse.ArgumentParser()
    training.add_config_arguments(parser)
    return training.train(training.config_from_args(parser.parse_args(argv)), given=flags_given(parser, argv))


def _certify(argv: list[str]) -> list:
    """certify.py's run, in this process; its rows."""
    opts = resolve_options(RunOptions.from_namespace(certify_parser().parse_args(argv)))
    return run_certify(opts, argv)[0]


def header(check: Check) -> list[str]:
    """The device and software the check ran on."""
    model = device_model(check.device)
    extra = ""
    if not check.cpu:
        props = torch.cuda.get_device_properties(check.device)
        extra = f", {model['sm_count']} SMs, capability {model['capability']}, {props.total_memory / 2**30:.1f} GiB"
    cuda = f" (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})" if not check.cpu else ""
    return ["# GPU check", "",
            f"- device: {check.device} ({model.get('name', model['type'])}{extra}); native bf16: "
            f"{'yes' if native_bf16(check.device) else 'no'}",
            f"- torch {torch.__version__}{cuda}, python {platform.python_version()}, CPU "
            f"{device_model(torch.device('cpu'))['name']}",
            f"- the CLIs' TF32 default: --tf32 {DEFAULT_TF32} (cuDNN convolutions in TF32, matmuls in fp32)",
            f"- started {time.strftime('%Y-%m-%d %H:%M:%S')}", ""]


def cuda_tests(check: Check) -> tuple[str, list[str]]:
    """``pytest -m cuda``, in a process of its own."""
    if check.cpu:
        return NA_CPU, []
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    out = proc.stdout.strip().splitlines()
    lines = ["    " + " ".join(cmd[2:]), "", *[f"- {line}" for line in out if line.startswith(("FAILED", "ERROR"))],
             f"- {out[-1] if out else proc.stderr.strip()[-300:]}"]
    return ("PASS" if proc.returncode == 0 else "FAIL"), lines


def _state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def train_resume(check: Check) -> tuple[str, list[str]]:
    """fp16 fine-tuning on digits: steps 1..S in one run, and 1..S/2 then ``--resume`` to S; both must agree."""
    steps = 4 if check.cpu else 8
    out = check.outdir / "train"
    base = ["--dataset", "digits", "--device", str(check.device), "--precision", "fp16", "--batch", "16",
            "--num_noises", "2", "--workers", "0", "--no_test", "--no_tensorboard", "--no_progress", "--log_every",
            "1", "--epochs", "1", "--seed", "0"]
    runs = [base + ["--max_steps", str(steps), "--outdir", str(out / "whole")],
            base + ["--max_steps", str(steps // 2), "--outdir", str(out / "halves")],
            ["--dataset", "digits", "--resume", str(out / "halves" / f"checkpoint-step{steps // 2}.pth.tar"),
             "--device", str(check.device), "--workers", "0", "--no_progress", "--no_test", "--no_tensorboard",
             "--log_every", "1", "--max_steps", str(steps)]]  # (the flags a resume does not take from the run)
    for argv in runs:
        _train(argv)
    logs = [(out / name / "log_steps.txt").read_text() for name in ("whole", "halves")]
    ckpts = [_state(out / name / f"checkpoint-step{steps}.pth.tar") for name in ("whole", "halves")]
    weights = all(torch.equal(a, ckpts[1]["state_dict"][k]) for k, a in ckpts[0]["state_dict"].items())
    scaler = ckpts[0]["scaler"] == ckpts[1]["scaler"]
    same_log = logs[0] == logs[1] and len(logs[0].splitlines()) == steps + 1
    lines = [*(_command("train.py", argv) for argv in runs), "",
             f"- step log of {steps} steps, resumed at step {steps // 2}: {'identical' if same_log else 'DIFFERENT'}",
             f"- weights after step {steps}: {'identical' if weights else 'DIFFERENT'}; loss scaler state: "
             f"{'identical' if scaler else 'DIFFERENT'} (scale {(ckpts[0]['scaler'] or {}).get('scale')})"]
    return ("PASS" if same_log and weights and scaler else "FAIL"), lines


def certify_parity(check: Check) -> tuple[str, list[str]]:
    """digits: batch sizes B1, B2 (must agree exactly); fp32 --tf32 off against --tf32 conv and --precision auto."""
    n0, n, images, b1, b2 = ("50", "100", "3", "100", "37") if check.cpu else ("100", "10000", "50", "2000", "777")
    out = check.outdir / "certify"
    base = ["--dataset", "digits", "--sigma", "0.25", "--N0", n0, "--N", n, "--max_images", images, "--device",
            str(check.device), "--no_progress", "--seed", "0", "--overwrite"]
    runs = {"fp32, batch " + b1: ["--precision", "fp32", "--batch_size", b1],
            "fp32, batch " + b2: ["--precision", "fp32", "--batch_size", b2],
            "fp32 --tf32 off": ["--precision", "fp32", "--tf32", "off", "--batch_size", b1],
            "--precision auto": ["--precision", "auto", "--batch_size", b1]}
    rows, lines = {}, []
    for i, (label, extra) in enumerate(runs.items()):
        argv = base + extra + ["--outfile", str(out / f"run{i}.tsv")]
        rows[label] = [(r.idx, r.predict, r.radius, r.correct) for r in _certify(argv)]
        lines.append(_command("certify.py", argv))
    first, second, exact = list(rows)[:3]
    same = rows[first] == rows[second]
    lines += ["", f"- {first} and {second}: {'identical logs' if same else 'DIFFERENT logs'} ({images} images, N={n})"]
    for label in (first, "--precision auto"):
        pairs = list(zip(rows[exact], rows[label]))
        agree = sum(a[1] == b[1] for a, b in pairs)
        worst = max(abs(a[2] - b[2]) for a, b in pairs)
        lines.append(f"- {label} against {exact}: {agree} of {len(pairs)} predictions agree, largest radius change "
                     f"{worst:.4g}")
    return ("PASS" if same else "FAIL"), lines


def _bench_runs(check: Check) -> list[tuple[str, list[str]]]:
    """(label, bench.py flags) of the bench runs: GPU: fp32/bf16/fp16 with --tf32 off, TF32, compiled; CPU: one."""
    if check.cpu:
        return [("fp32", ["--configs", "cifar10", "--precisions", "fp32", "--batch_size", "1", "--iters", "1",
                          "--N", "1000", "--agreement_samples", "0", "--no_finetune"])]
    common = ["--rounds", "1", "--batch_size", "auto"]  # auto: doubling from 32 up to --N
    return [("--tf32 off", ["--configs", "cifar10", "--precisions", "fp32", "bf16", "fp16", "--tf32", "off",
                            "--N", "2048", "--iters", "2", *common]),
            ("--tf32 off", ["--configs", "imagenet", "--precisions", "fp32", "bf16", "fp16", "--tf32", "off",
                            "--N", "128", "--iters", "1", "--no_finetune", *common]),
            ("--tf32 on", ["--configs", "cifar10", "imagenet", "--precisions", "fp32", "--tf32", "on", "--N", "128",
                           "--iters", "1", "--no_finetune", *common]),
            ("compiled", ["--configs", "cifar10", "--precisions", "auto", "--compile", "--rounds", "1", "--batch_size",
                          "256", "--iters", "2", "--no_finetune", "--agreement_samples", "0"])]


def bench(check: Check) -> tuple[str, list[str]]:
    """bench.py (its own process per run), one table of every certification path timed."""
    lines, table, ok = [], [], True
    for i, (label, flags) in enumerate(_bench_runs(check)):
        result = check.outdir / "bench" / f"bench{i}.json"
        argv = [*flags, "--device", str(check.device), "--weights", "random", "--json", str(result)]
        lines.append(_command("bench.py", argv))
        result.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, str(REPO / "bench.py"), *argv], cwd=REPO, capture_output=True,
                              text=True, timeout=600)
        if proc.returncode != 0:
            ok = False
            table.append(f"| {' '.join(flags[:2])} | {label} | FAILED: {proc.stderr.strip()[-200:]} | | | | | |")
            continue
        for config in json.loads(result.read_text())["configs"]:
            for r in config["certify"]:
                agree = r.get("agreement_vs_fp32", {}).get("agreement")
                compiled = " compiled" if r["compiled"] else ""
                table.append(f"| {config['config']} | {r['path']} {r['precision']}{compiled} ({label}) | "
                             f"{r['batch_size']} | {r['samples_per_s']:.1f} | "
                             f"{r['speedup_vs_reference']:.2f} | {'' if agree is None else f'{100 * agree:.1f} %'} | "
                             f"{r['peak_memory_mb']:.0f} | {r['sec_per_image']:.1f} at N={config['N']} |")
    if check.cpu:
        table.append(f"| imagenet, TF32, bf16, fp16, compiled | {NA_CPU} | | | | | | |")
    head = ["", "| config | path | batch | samples/s | x reference | same class as fp32 | peak MiB | s/image |",
            "|---|---|---|---|---|---|---|---|"]
    return ("PASS" if ok else "FAIL"), lines + head + table


def memory_per_sample(check: Check) -> tuple[str, list[str]]:
    """The ImageNet f o D's peak memory at batches 8 and 16 per precision: the growth per sample."""
    if check.cpu:
        return NA_CPU, []
    from classifier import get_architecture
    from denoiser import build_denoiser
    from fast import fast_model
    from presets import IMAGENET
    from runkit.devices import autocast

    denoiser = build_denoiser(IMAGENET.denoiser).to(check.device).eval()
    classifier = get_architecture(IMAGENET.arch, num_classes=IMAGENET.num_classes, device=check.device).eval()
    total = torch.cuda.get_device_properties(check.device).total_memory / 2**20
    lines = ["| precision | peak MiB at batch 8 | at 16 | MiB per sample | batch that fills the GPU |",
             "|---|---|---|---|---|"]
    for precision in dict.fromkeys(("fp32", "bf16" if native_bf16(check.device) else "fp16", "fp16")):
        model = fast_model(denoiser, classifier, 0.25, precision, False, False, None)
        peaks = []
        for batch in (8, 16):
            x = torch.rand(batch, 3, IMAGENET.image_size, IMAGENET.image_size, device=check.device)
            torch.cuda.synchronize(check.device)
            torch.cuda.reset_peak_memory_stats(check.device)
            with torch.inference_mode(), autocast(check.device, precision):
                model(x)
            torch.cuda.synchronize(check.device)
            peaks.append(torch.cuda.max_memory_allocated(check.device) / 2**20)
        per = (peaks[1] - peaks[0]) / 8
        fits = int((total - peaks[0]) / per) + 8 if per > 0 else "-"
        lines.append(f"| {precision} | {peaks[0]:.0f} | {peaks[1]:.0f} | {per:.1f} | {fits} |")
        del model
        torch.cuda.empty_cache()
    return "measured", lines


def _syncs(run: Callable[[], Any]) -> int:
    """How many synchronizing CUDA operations ``run`` performs (``torch.cuda.set_sync_debug_mode('warn')``)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def host_syncs(check: Check) -> tuple[str, list[str]]:
    """Synchronizing operations of certify (N = 1000 against 3000 at batch 500: per extra batch) and of training (2
    against 4 optimizer steps: per step), on digits."""
    if check.cpu:
        return NA_CPU, []
    from certification import build_smoothed
    from core import image_generator
    from datasets import get_dataset

    argv = ["--dataset", "digits", "--sigma", "0.25", "--device", str(check.device), "--precision", "auto",
            "--outfile", str(check.outdir / "unused.tsv")]
    smoothed = build_smoothed(resolve_options(RunOptions.from_namespace(certify_parser().parse_args(argv))),
                              check.device)
    x = get_dataset("digits", "test")[0][0].to(check.device)
    counts = {n: _syncs(lambda n=n: smoothed.certify(x, 100, n, 0.001, 500, generator=image_generator(0, 0)))
              for n in (1000, 3000)}
    base = ["--dataset", "digits", "--device", str(check.device), "--batch", "16", "--num_noises", "2",
            "--workers", "0", "--no_test", "--no_tensorboard", "--no_progress", "--log_every", "1000", "--epochs", "1"]
    steps = {s: _syncs(lambda s=s: _train(base + ["--max_steps", str(s), "--outdir", str(check.outdir / f"sync{s}")]))
             for s in (2, 4)}
    return "measured", [
        f"- certify one image, N0=100, batch 500: N=1000 {counts[1000]} syncs, N=3000 {counts[3000]}: "
        f"{(counts[3000] - counts[1000]) / 4:g} per estimation batch",
        f"- train (digits, --log_every 1000): 2 steps {steps[2]} syncs, 4 steps {steps[4]}: "
        f"{(steps[4] - steps[2]) / 2:g} per optimizer step"]


SECTIONS = (("cuda tests (`pytest -m cuda`)", cuda_tests), ("fp16 training and resume (digits)", train_resume),
            ("certify parity (digits)", certify_parity), ("bench: cifar10 and imagenet", bench),
            ("ImageNet memory per sample", memory_per_sample),
            ("host syncs (`torch.cuda.set_sync_debug_mode('warn')`)", host_syncs))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run every section into ``--outdir``/gpu_check.md; exit status 1 when one failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--outdir", default=str(REPO / "runs" / "gpu_check"), help="where gpu_check.md goes")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    check = Check(device=torch.device("cuda", torch.cuda.current_device()) if device == torch.device("cuda")
                  else device, outdir=Path(args.outdir))
    check.outdir.mkdir(parents=True, exist_ok=True)
    check.lines = header(check)
    start = time.perf_counter()
    for number, (title, section) in enumerate(SECTIONS, 1):
        t0 = time.perf_counter()
        try:
            status, body = section(check)
        except Exception as err:  # a failed section is reported, the others still run
            status, body = "FAIL", [f"- {type(err).__name__}: {str(err).strip()[-500:]}"]
        if status == "FAIL":
            check.failed.append(title)
        check.lines += [f"## {number}. {title}: {status} ({time.perf_counter() - t0:.0f} s)", "", *body]
        check.lines += [""] if body else []
        check.write()
        print(f"gpu_check: {title}: {status}", flush=True)
    verdict = f"FAIL ({'; '.join(check.failed)})" if check.failed else "PASS"
    started = next(i for i, line in enumerate(check.lines) if line.startswith("- started"))
    check.lines.insert(started + 1, f"- result: {verdict}, {time.perf_counter() - start:.0f} s in all")
    check.write()
    print(f"gpu_check: {verdict}; wrote {check.outdir / 'gpu_check.md'}")
    if check.failed:
        raise SystemExit(1)


if __name__ == "__main__":
    run_cli(main)
