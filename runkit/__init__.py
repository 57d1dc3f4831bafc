"""The run machinery beside the method: what every script shares so that a bad flag, a missing file, an interrupted
or multi-GPU run behaves the same way everywhere. Nothing here is part of FT-CADIS itself.

* :mod:`runkit.errors`: :class:`~runkit.errors.UserError`, the one-line error about the user's input, and
  :class:`~runkit.errors.RunWarning`, the one-line warning.
* :mod:`runkit.cli`: ``run_cli`` (``error:`` line, exit 2), ``flags_given``, ``check_number``.
* :mod:`runkit.devices`: devices, autocast precision (``--precision auto``), CPU threads.
* :mod:`runkit.files`: atomic writes, temporary files of killed writers, content fingerprints, output checks.
* :mod:`runkit.locks`: run locks (one run per output, released by the kernel however the holder exits).
* :mod:`runkit.rng`: seeding the global RNGs, their states for checkpoints (every rank's).
* :mod:`runkit.resume`: resuming a run from its output folder (newest checkpoint, the run's configuration), and a
  log from its rows (``--resume`` checked against the sidecar, or ``--overwrite``).
* :mod:`runkit.stops`: SIGTERM/SIGINT as a request to stop at the next safe point (a checkpoint, then exit).
* :mod:`runkit.distributed`: ``torchrun`` set-up (``DistInfo``, ``init_distributed``, ``barrier``).
* :mod:`runkit.logs`: the one reader/writer of tab-separated logs (complete lines, rows, appending).
* :mod:`runkit.parts`: ``torchrun`` rank parts ``<outfile>.rank<r>`` and their merge.
* :mod:`runkit.shards`: ``--shard K/S`` logs ``<outfile>.shard<k>of<s>`` and their merge (``--merge``).
* :mod:`runkit.sidecars`: the configuration beside an output (``<outfile>.json``).
* :mod:`runkit.checkpoints`: the one checkpoint reader.
* :mod:`runkit.memory`: out-of-memory errors, batches that halve on them, the largest batch that fits
  (``--batch_size auto``).
* :mod:`runkit.progress`: progress of long work (a tqdm bar on a terminal, one plain line per interval elsewhere).

Importing the package imports nothing else (analysis starts without torch).
"""
