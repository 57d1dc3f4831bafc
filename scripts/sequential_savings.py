"""Samples per image of sequential CERTIFY vs fixed-N CERTIFY on realistic pA: Cohen et al.'s published logs.

Each certified row of a log gives its image the pA = Phi(radius / sigma) (the bound Cohen's run proved), each
abstention a pA below 1/2 (``--abstain_pA``); a row whose certified class was not the label keeps that pA but never
counts as correct. The known-pA simulator (``sequential.simulate_certify``: counts drawn as binomials, the same selection,
bounds and stopping rules as ``core.Smooth``) then certifies every image in both modes at N = n_max (CIFAR-10
100,000, ImageNet 10,000), alpha = 0.001, radii = 0 and the paper's table radii that n_max can certify. Printed per
log: the certified accuracy (%) of each mode at each radius (mean over ``--trials``), the largest difference, the
mean estimation samples per image and the saving N / mean; then the samples per image of ``--skip_wrong`` in each
mode (an image is estimated only when its guess is its label; Cohen's abstentions count as right guesses, so the
figure is an upper bound).

    python scripts/sequential_savings.py                       # the six logs, 5 trials each (about a minute)
    python scripts/sequential_savings.py --dataset cifar10 --max_rows 100 --trials 1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from scipy.stats import norm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from runkit.cli import run_cli  # noqa: E402
from runkit.errors import UserError  # noqa: E402
from runkit.logs import read_log  # noqa: E402
from sequential import default_sequential_radii, simulate_certify  # noqa: E402

LOGS = REPO / "tests" / "fixtures" / "cohen_logs" / "certify"
CONFIGS = {"cifar10": ("cifar10/resnet110", 100_000), "imagenet": ("imagenet/resnet50", 10_000)}
SIGMAS = (0.25, 0.5, 1.0)


def log_path(logs: Path, dataset: str, sigma: float) -> Path:
    """Cohen's log of the model trained and certified at ``sigma``."""
    return logs / CONFIGS[dataset][0] / f"noise_{sigma:.2f}" / "test" / f"sigma_{sigma:.2f}"


def pA_from_log(path: Path, sigma: float, abstain_pA: float, max_rows: Optional[int] = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pA, correct, abstained) per row: pA = Phi(radius / sigma) where Cohen certified, ``abstain_pA`` where he
    abstained."""
    df = read_log(path)
    if max_rows is not None:
        df = df.iloc[:max_rows]
    abstained = df["predict"].to_numpy() < 0
    pA = np.where(abstained, abstain_pA, norm.cdf(df["radius"].to_numpy() / sigma))
    return pA, df["correct"].to_numpy(dtype=bool), abstained


def certified_table(prediction: np.ndarray, radius: np.ndarray, correct: np.ndarray, radii: Sequence[float]
                    ) -> np.ndarray:
    """Certified accuracy at each radius: the share of images certified with their pA class, correct, radius >= r."""
    hit = (prediction == 0) & correct
    return np.array([np.mean(hit & (radius >= r)) for r in radii])


def compare(pA: np.ndarray, correct: np.ndarray, sigma: float, n: int, alpha: float, radii: Sequence[float],
            trials: int, seed: int, n0: int = 100, label_is_top: Optional[np.ndarray] = None) -> dict[str, Any]:
    """Both modes, ``trials`` times each: mean tables (fractions) and mean estimation samples per image, also with
    the label-aware early exit (``label_is_top``: class 0 is the label; default ``correct``)."""
    rng = np.random.default_rng(seed)
    label_is_top = correct if label_is_top is None else label_is_top
    tables: dict[str, list[np.ndarray]] = {"fixed": [], "sequential": []}
    used: dict[str, list[float]] = {"sequential": [], "skip_wrong": [], "both": []}
    for _ in range(trials):
        for mode, mode_radii in (("fixed", None), ("sequential", radii)):
            prediction, radius, n_used = simulate_certify(pA, n0, n, alpha, sigma, rng, radii=mode_radii)
            tables[mode].append(certified_table(prediction, radius, correct, radii))
            if mode == "sequential":
                used[mode].append(n_used.mean())
            skip = "both" if mode == "sequential" else "skip_wrong"
            used[skip].append(simulate_certify(pA, n0, n, alpha, sigma, rng, radii=mode_radii,
                                               label_is_top=label_is_top)[2].mean())
    fixed, sequential = np.mean(tables["fixed"], 0), np.mean(tables["sequential"], 0)
    samples = {mode: float(np.mean(values)) for mode, values in used.items()}
    return {"radii": list(radii), "fixed": fixed, "sequential": sequential, "n": n, "samples": samples["sequential"],
            "saving": n / samples["sequential"], "max_diff": float(np.max(np.abs(fixed - sequential))),
            "samples_by_mode": {"fixed": float(n), **samples}}


def format_result(name: str, result: dict[str, Any]) -> str:
    radii = "  ".join(f"{r:>6g}" for r in result["radii"])
    lines = [f"{name}: N = n_max = {result['n']}, radii {radii}"]
    for mode in ("fixed", "sequential"):
        lines.append(f"  {mode:<10s} " + "  ".join(f"{100 * a:6.2f}" for a in result[mode]))
    lines.append(f"  largest difference {100 * result['max_diff']:.2f} points; samples/image "
                 f"{result['samples']:.0f} (fixed {result['n']}): {result['saving']:.1f}x fewer")
    lines.append("  samples/image by mode: " + ", ".join(f"{mode} {value:.0f}"
                                                        for mode, value in result["samples_by_mode"].items()))
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sequential vs fixed-N CERTIFY on pA taken from Cohen et al.'s logs.")
    p.add_argument("--dataset", choices=("cifar10", "imagenet", "both"), default="both")
    p.add_argument("--logs", default=str(LOGS), help="folder holding <dataset>/<arch>/noise_s/test/sigma_s logs")
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--abstain_pA", type=float, default=0.4, help="pA given to Cohen's abstentions (< 0.5)")
    p.add_argument("--trials", type=int, default=5, help="simulated certifications of each log per mode")
    p.add_argument("--max_rows", type=int, default=None, help="only the first rows of each log (for speed)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict[str, dict[str, Any]]:
    args = get_parser().parse_args(argv)
    if not 0 <= args.abstain_pA < 0.5:
        raise UserError(f"--abstain_pA {args.abstain_pA}: must lie in [0, 0.5)")
    if args.trials < 1:
        raise UserError(f"--trials {args.trials}: must be >= 1")
    results = {}
    for dataset in (("cifar10", "imagenet") if args.dataset == "both" else (args.dataset,)):
        n = CONFIGS[dataset][1]
        for sigma in SIGMAS:
            path = log_path(Path(args.logs), dataset, sigma)
            pA, correct, abstained = pA_from_log(path, sigma, args.abstain_pA, args.max_rows)
            radii = default_sequential_radii(dataset, sigma, n, args.alpha)
            name = f"{dataset} sigma={sigma:g} ({len(pA)} rows)"
            results[name] = compare(pA, correct, sigma, n, args.alpha, radii, args.trials, args.seed,
                                    label_is_top=correct | abstained)
            print(format_result(name, results[name]), flush=True)
    return results


if __name__ == "__main__":
    run_cli(main)
