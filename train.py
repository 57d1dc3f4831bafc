"""FT-CADIS: fine-tune an off-the-shelf classifier on denoised images (METHOD §4), under ``torchrun``.

A thin CLI over :mod:`training` (the loop, checkpoints, logs); the flags are the fields of
:class:`training.TrainConfig`, which define their defaults and help.

    torchrun --nproc_per_node 4 train.py --dataset cifar10 --train_noise_sd 1.0 --lbd 4.0 --use_fp16 true ...
    python train.py --dataset digits --train_noise_sd 0.5 --epochs 2 --device cpu     # the embedded demo data

Outputs in ``--outdir``: ``log.txt`` (one TSV row per epoch), ``log_steps.txt`` (one row per logged optimizer
step) and ``checkpoint-<epoch>.pth.tar`` after epoch 1, every 5th and the last (plus ``checkpoint-step<N>.pth.tar``
every ``--ckpt_every_steps`` and when ``--max_steps`` stops the run), written atomically, each with
``<checkpoint>.sha256`` (verified whenever it is loaded). A checkpoint holds the
model (timm state dict, LoRA unmerged), optimizer, scaler, epoch/step position and every rank's RNG states;
``--resume`` continues from it exactly (on the CPU bit for bit; where it holds: docs/USAGE.md, "Exactness").
SIGTERM / SIGINT stop the run after the current optimizer step with ``checkpoint-step<N>.pth.tar`` (exit 143 / 130).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, Optional, Sequence

from runkit.cli import exit_on_interrupt, flags_given, run_cli

exit_on_interrupt(__name__)  # a Ctrl-C while the libraries below load exits 130, no traceback

from runkit.stops import RunStopped
from training import NonFiniteLossError, add_config_arguments, config_from_args, train


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags: one per :class:`training.TrainConfig` field."""
    parser = argparse.ArgumentParser(
        description="FT-CADIS fine-tuning of an off-the-shelf classifier on denoised images (run under torchrun for "
                    "several GPUs/processes).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse ``argv`` and train; a non-finite loss ends the process with exit status 1, a SIGTERM/SIGINT (after its
    checkpoint) with 128 + the signal's number."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return train(config_from_args(args), given=flags_given(parser, argv))
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except RunStopped as stopped:  # SIGTERM/SIGINT: the checkpoint is written; 143/130, as the signal would have
        print(f"{stopped}: {stopped.checkpoint}", file=sys.stderr)
        raise SystemExit(stopped.exit_status) from None


if __name__ == "__main__":
    run_cli(main)
