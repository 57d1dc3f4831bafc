"""Predict with the smoothed classifier g(x) = argmax_c P[f(D(x + delta)) = c], abstaining when unsure (Cohen et
al. PREDICT).

For each selected image it runs ``core.Smooth.predict`` with N noise samples at failure probability alpha (the
two-sided binomial test of Cohen et al.: the top class is returned only when it beats the runner-up significantly,
else -1) and writes one row of a Cohen-format log:

    idx  label  predict  correct  time

Everything else is certify.py's: the same model, data, precision, --seed (image idx's noise seeded by (seed, idx)),
--resume, ``torchrun`` and ``--shard K/S``/``--merge`` options and guarantees (see ``python certify.py -h``); the
work is done by ``certification.py``.

    python predict.py --dataset cifar10 --sigma 0.25 --finetuned_path runs/ckpt.pt --N 1000 --outfile logs/p.tsv
    python analyze.py logs/p.tsv          # accuracy and abstention rate
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from runkit.cli import exit_on_interrupt, run_cli

exit_on_interrupt(__name__)  # a Ctrl-C while the libraries below load exits 130, no traceback

from certification import RunOptions, add_run_arguments, merge_shards, predict_method, resolve_options, run
from runkit.logs import PredictRow
from runkit.shards import merge_request


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Predict with a denoised-smoothed classifier (Cohen et al. PREDICT, "
                                            "abstaining when unsure); writes a tab-separated log "
                                            "'idx label predict correct time'.")
    return add_run_arguments(p)


def main(argv: Optional[Sequence[str]] = None) -> Optional[list[PredictRow]]:
    """Run the prediction (or ``--merge OUTFILE`` the shard logs); returns the merged log's rows on rank 0 (None on
    the other ranks)."""
    merge = merge_request(sys.argv[1:] if argv is None else argv)
    if merge is not None:
        return merge_shards(merge.outfile, (PredictRow,), merge.override)  # type: ignore[return-value]
    opts = resolve_options(RunOptions.from_namespace(get_parser().parse_args(argv)))
    logs = run(opts, PredictRow, lambda smoothed, o: predict_method(smoothed, o.N, o.alpha, o.batch_size),
               list(sys.argv if argv is None else argv))
    return logs if logs is None or len(logs) > 1 else logs[0]  # type: ignore[return-value]


if __name__ == "__main__":
    run_cli(main)
