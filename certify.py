"""Certify the smoothed classifier g(x) = argmax_c P[f(D(x + delta)) = c] on a dataset (Cohen et al. CERTIFY).

For each selected test image (dataset indices 0, skip, 2*skip, ..., at most --max_images of them) it runs
``core.Smooth.certify`` with N0 selection and N estimation samples at failure probability alpha, and writes one row
of a Cohen-format log:

    idx  label  predict  radius  correct  time

(tab-separated; ``predict`` -1 = abstain, ``radius`` at full precision, ``correct`` 0/1, ``time`` seconds). Image
``idx``'s noise comes from a generator seeded by (--seed, idx), so a log depends neither on --batch_size nor on the
number of processes nor on interruptions: under ``torchrun`` rank r certifies every W-th remaining image into
``<outfile>.rank<r>``, and rank 0 merges the parts into one idx-sorted log at the end. ``<outfile>.json`` records
the configuration; ``--resume`` continues an interrupted run (single-process or sharded) after checking it.
``--fast`` (implied by ``--precision bf16|fp16`` and ``--compile``) takes the opt-in speed-ups of ``fast.py``.
``--shard K/S`` (or ``auto`` in a Slurm array task) certifies only every S-th selected image from the K-th into
``<outfile>.shard<K>of<S>``; ``certify.py --merge OUTFILE`` then checks and merges the shard logs.
The work is done by ``certification.py``; this file is its command line.

``--sequential`` (``--N`` becomes n_max) stops each image's estimation once the requested ``--radii`` are decided
(``sequential.certify_sequential``: same guarantee, a fraction of the samples); ``--skip_wrong`` (measuring accuracy
only) skips estimation where the selection guess is not the label. Both add a column ``n``, the estimation samples
used. Several classifiers (``--off-the-shelf --finetuned_path A B``) share every denoised sample, one log each
(``--outfile off.tsv a.tsv b.tsv``), each identical to that classifier's own run with the same seed.

    python certify.py --dataset cifar10 --sigma 0.25 --finetuned_path runs/ckpt.pt --outfile logs/c10_025.tsv
    python certify.py --dataset cifar10 --sigma 0.5 --sequential --off-the-shelf --finetuned_path a.pt b.pt \
        --outfile logs/off.tsv logs/a.tsv logs/b.tsv
    torchrun --nproc_per_node 8 certify.py --dataset imagenet --sigma 0.5 --off-the-shelf --outfile logs/in.tsv
    sbatch --array=0-7 --wrap "python certify.py ... --outfile logs/in.tsv --shard auto --resume"
    python certify.py --merge logs/in.tsv
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from runkit.cli import exit_on_interrupt, run_cli

exit_on_interrupt(__name__)  # a Ctrl-C while the libraries below load exits 130, no traceback

from certification import RunOptions, certify_parser, merge_shards, resolve_options, run_certify
from runkit.logs import Row, SampledRow
from runkit.shards import merge_request

get_parser = certify_parser  # certify.py's flags (defined in the library, which demo.py also runs)


def main(argv: Optional[Sequence[str]] = None) -> Optional[list[Row] | list[list[Row]]]:
    """Run the certification (or ``--merge OUTFILE`` the shard logs); returns the merged log's rows on rank 0
    (several classifiers: the rows of each log; None on the other ranks)."""
    merge = merge_request(sys.argv[1:] if argv is None else argv)
    if merge is not None:
        return merge_shards(merge.outfile, (Row, SampledRow), merge.override)  # type: ignore[return-value]
    opts = resolve_options(RunOptions.from_namespace(get_parser().parse_args(argv)))
    logs = run_certify(opts, list(sys.argv if argv is None else argv))
    return logs if logs is None or len(logs) > 1 else logs[0]  # type: ignore[return-value]


if __name__ == "__main__":
    run_cli(main)
