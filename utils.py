"""Shared helpers: user-facing errors, devices, precision, atomic files and torch.distributed.

Every script in this repository uses these, so that a bad flag, a missing file or a multi-GPU launch
behaves the same way everywhere.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import pickle
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

if TYPE_CHECKING:  # torch is imported lazily so that light scripts (analyze.py) start fast
    import argparse

    import torch

PRECISIONS = ("fp32", "bf16", "fp16")
PRECISION_CHOICES = ("auto",) + PRECISIONS  # what the CLIs' --precision accepts; see resolve_precision


class UserError(Exception):
    """A problem with the user's input (a flag, a file, a checkpoint). CLIs print it as one line, exit 2."""


def run_cli(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None) -> None:
    """Run a script's ``main`` and turn a :class:`UserError` into ``error: <message>`` and exit status 2."""
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def resolve_device(device: Optional[str] = None, flag: str = "--device") -> "torch.device":
    """``None``/``"auto"`` -> CUDA when available, else CPU; otherwise the named device, checked to exist here.

    Args:
        device: ``cpu``, ``cuda``, ``cuda:1``, ``mps``, ``xpu`` or None/``auto``.
        flag: the flag named in errors.

    Raises:
        UserError: a device kind torch does not know, one this machine lacks, or ``meta`` (no data: a run on it
            would compute nothing).
    """
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise UserError(f"{flag} {device}: unknown device ({err})") from None
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
                 "mps": lambda: hasattr(torch.backends, "mps") and torch.backends.mps.is_available(),
                 "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available()}
    if dev.type not in available:
        raise UserError(f"{flag} {device}: not a device this program runs on; use cpu, cuda[:N], mps or xpu")
    if not available[dev.type]():
        raise UserError(f"{flag} {device}: {dev.type.upper()} is not available on this machine (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def precision_dtype(precision: str) -> "torch.dtype":
    """Map ``fp32``/``bf16``/``fp16`` to a torch dtype."""
    import torch

    try:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    except KeyError:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}") from None


# values of oneDNN's ONEDNN_MAX_CPU_ISA that still allow its native bf16 kernels (AVX512-BF16, AMX)
ONEDNN_ISAS_WITH_BF16 = frozenset({"ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512",
                                   "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX",
                                   "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2"})


def cpu_has_native_bf16(cpuinfo: Optional[str] = None) -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX-BF16), from /proc/cpuinfo's
    flags (and ``ONEDNN_MAX_CPU_ISA``, when set, allowing them). Without them oneDNN emulates bf16 and a matmul runs
    tens of times slower than fp32 (AVX2: 3.2 against 73.6 GFLOP/s, 256-cube, one Zen 4 thread with
    ``ONEDNN_MAX_CPU_ISA=AVX2``). False where /proc/cpuinfo does not exist (e.g. macOS): fp32 is the safe choice.

    Args:
        cpuinfo: the text of /proc/cpuinfo (tests pass their own); None reads the file.
    """
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()  # oneDNN told to stay below bf16 instructions
    if isa not in ONEDNN_ISAS_WITH_BF16:
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def native_bf16(device: "torch.device") -> bool:
    """Whether ``device`` computes bf16 natively: CUDA with bf16 support (Ampere+), or :func:`cpu_has_native_bf16`."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def matmul_rate(dtype: "torch.dtype", size: int = 256, repeats: int = 3) -> float:
    """GFLOP/s of one size x size matrix product in ``dtype`` on the CPU (best of ``repeats``): a quick probe."""
    import torch

    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / max(best, 1e-9) / 1e9


_WARNED: set = set()


def resolve_precision(precision: str, device: "torch.device", flag: str = "--precision") -> str:
    """The autocast precision a run uses: ``auto`` -> bf16 where ``device`` computes it natively (:func:`native_bf16`),
    else fp16 on CUDA, else fp32. An explicit bf16 on a CPU without native bf16 is kept, with one warning per process
    stating the measured cost (a 256-cube matmul probe, bf16 against fp32).

    Args:
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        device: where the run computes.
        flag: the flag named in errors and the warning.
    """
    import torch

    if precision not in PRECISION_CHOICES:
        raise UserError(f"{flag} {precision!r}: choose one of {', '.join(PRECISION_CHOICES)}")
    device = torch.device(device)
    if precision == "auto":
        if native_bf16(device):
            return "bf16"
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16() and "bf16" not in _WARNED:
        _WARNED.add("bf16")
        slow, fast = matmul_rate(torch.bfloat16), matmul_rate(torch.float32)
        warnings.warn(f"{flag} bf16: this CPU has no native bf16 (no avx512_bf16/amx_bf16 flag); a bf16 matmul ran "
                      f"at {slow:.1f} GFLOP/s against {fast:.1f} in fp32 here, so bf16 is likely slower than fp32; "
                      "use --precision auto (fp32 here)", stacklevel=2)
    return precision


def autocast(device: "torch.device", precision: str = "fp32") -> contextlib.AbstractContextManager:
    """Autocast context for ``precision`` on ``device``; a no-op for fp32 (results are then exact fp32)."""
    import torch

    dtype = precision_dtype(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def attention(q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", scale: float, explicit: bool = False
              ) -> "torch.Tensor":
    """softmax(q kᵀ · scale) v over the last two dimensions: ``[..., T_q, d]``, ``[..., T, d]`` -> ``[..., T_q, d]``.

    ``F.scaled_dot_product_attention``; with ``explicit`` (chosen by the fast path, :mod:`fast`) the explicit
    ``softmax((q·scale) kᵀ) v``: the same function, with the scores rounded to q's dtype before the softmax (the
    fused kernels keep them in fp32).
    """
    import torch.nn.functional as F

    if explicit:
        return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def process_umask() -> int:
    """This process's umask, read without changing it (``/proc/self/status``), else by setting and restoring it."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike, mode: str, **open_kwargs: Any) -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success fsync it and rename it onto ``path``, on failure remove it.

    The file gets the mode a plain ``open`` would give it: an existing ``path``'s mode, else 0666 less the umask
    (``mkstemp`` alone creates 0600, unreadable to the colleagues the umask admits).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            file_mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            file_mode = 0o666 & ~process_umask()
        os.fchmod(fd, file_mode)
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temporary_files(folder: str | os.PathLike, name: str = "*") -> list[Path]:
    """Remove the temporary files that atomic writes of ``folder/name`` left when their process was killed (call
    only while holding the folder's (or the file's) run lock: a live writer's temporary file looks the same).

    Args:
        folder: the folder.
        name: the file name (a glob) whose temporary files to remove.
    """
    stale = [p for p in Path(folder).glob(f".{name}.*.tmp") if p.is_file()]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: never a half-written file."""
    import torch

    with _atomic_file(path, "wb") as f:
        torch.save(obj, f)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary file beside ``path``, fsync, rename: never a half-written file."""
    with _atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------------------------
# Run locks
# ---------------------------------------------------------------------------------------------------------------

_HELD_LOCKS: dict = {}  # (st_dev, st_ino) of lock files this process holds -> path (POSIX locks ignore own process)


def lock_path(target: str | os.PathLike, is_dir: bool = False) -> Path:
    """The lock file of a run's output: ``<target>.lock`` beside a log, ``<outdir>/.lock`` inside an output folder."""
    target = Path(target)
    return target / ".lock" if is_dir else target.with_name(target.name + ".lock")


def _lock_holder(path: Path) -> str:
    """``pid N on HOST since TIME (COMMAND)`` from a lock file, or ``another process`` if it says nothing yet."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']} since {info['since']} ({info['command'][:120]})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _try_lock(path: Path) -> Optional[int]:
    """An fd holding an exclusive POSIX lock on ``path`` (created if missing), or None when another process holds it.

    A lock file removed and re-created by its holder between our open and our lock is detected (inode check) and
    retried, so two processes can never both believe they hold the lock of one path.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666 & ~process_umask())
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _held_here(path: Path) -> bool:
    """Whether this process already holds the lock file ``path`` (checked without opening it: closing any descriptor
    of a file releases a process's POSIX locks on it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) in _HELD_LOCKS


@contextlib.contextmanager
def run_lock(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive advisory lock on the lock file ``path`` for the whole run (see :func:`lock_path`).

    A POSIX ``fcntl`` lock: the kernel releases it when the process exits, however it exits (kill -9 included), so a
    crashed run leaves no stale lock; forked children (data-loader workers) do not inherit it. The file records who
    holds it (pid, host, start, command) and is removed on release.

    Args:
        path: the lock file (its folder must exist).
        what: names the protected output in the error, e.g. ``"--outfile runs/a.tsv"``.

    Raises:
        UserError: another process (or this one) holds the lock: one line naming the holder.
    """
    path = Path(path)
    try:
        fd = None if _held_here(path) else _try_lock(path)
    except OSError as err:  # e.g. a read-only folder
        raise UserError(f"{what}: cannot create its lock file {path} ({err.strerror}); choose a writable location"
                        ) from None
    if fd is None:
        holder = "this process" if _held_here(path) else _lock_holder(path)
        raise UserError(f"{what} is in use by {holder}: wait for that run to finish (or stop it); two runs on one "
                        f"output would mix their results (lock file {path})")
    key = (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
    _HELD_LOCKS[key] = path
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(info) + "\n").encode())
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        del _HELD_LOCKS[key]
        os.close(fd)


@contextlib.contextmanager
def job_run_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """:func:`run_lock` for a whole (possibly ``torchrun``) job: rank 0 holds it, and every rank raises the same
    :class:`UserError` when rank 0 could not take it (a collective: call it on every rank, after
    :func:`init_distributed`). Rank r's own files (e.g. log parts) are covered by rank 0's lock, since no other job
    gets past this point while it is held.

    Args:
        path: the lock file.
        what: names the protected output in the error.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        with run_lock(path, what):
            yield
        return
    with contextlib.ExitStack() as stack:
        message: list = [None]
        if dist.get_rank() == 0:
            try:
                stack.enter_context(run_lock(path, what))
            except UserError as err:
                message = [str(err)]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None:
            raise UserError(message[0])
        yield


# ---------------------------------------------------------------------------------------------------------------
# Content fingerprints
# ---------------------------------------------------------------------------------------------------------------

FINGERPRINT_FULL_BYTES = 64 << 20  # files up to this size are hashed whole
FINGERPRINT_CHUNK = 64 << 10
FINGERPRINT_CHUNKS = 256  # larger files: this many chunks, evenly spaced, first and last included


def file_fingerprint(path: str | os.PathLike) -> str:
    """``"<size>:<sha256 hex>"`` of a file's content (of a folder's files), cheap even for multi-GB checkpoints.

    Up to 64 MiB the whole file is hashed; above, 256 chunks of 64 KiB evenly spaced from the first byte to the last
    (16 MiB read, well under a second for a 2 GB file). Two checkpoints of one architecture differ in every
    floating-point chunk, so a sample tells them apart; the size is part of the fingerprint.

    Args:
        path: the file.
    """
    path = Path(path)
    if path.is_dir():  # a Hugging Face folder: the fingerprints of its files
        files = sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith("."))
        digest = hashlib.sha256("".join(f"{q.relative_to(path)}={file_fingerprint(q)};" for q in files).encode())
        return f"{sum(q.stat().st_size for q in files)}:{digest.hexdigest()}"
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FINGERPRINT_FULL_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        else:
            last = size - FINGERPRINT_CHUNK
            for i in range(FINGERPRINT_CHUNKS):
                f.seek(last * i // (FINGERPRINT_CHUNKS - 1))
                digest.update(f.read(FINGERPRINT_CHUNK))
    return f"{size}:{digest.hexdigest()}"


def check_fingerprint(path: str | os.PathLike, recorded: Optional[str], flag: str, where: str) -> None:
    """Refuse ``path`` when its content differs from the fingerprint ``recorded`` for it (None: nothing recorded).

    Args:
        path: the file given now.
        recorded: its :func:`file_fingerprint` at the time of ``where``.
        flag: the flag that names the file (for the message).
        where: what recorded it, e.g. ``"the log runs/a.tsv"``.
    """
    if recorded is not None and file_fingerprint(path) != recorded:
        raise UserError(f"{flag} {path}: not the file {where} was written with (same name, other content); "
                        "resume with that very file, or start a new output")


def load_error_message(err: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in one line. A file it refused because it holds pickled
    Python objects other than tensors is said to be refused, without torch's advice to retry with
    ``weights_only=False`` (which would run whatever code the file carries)."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) and "weights only" in text.lower():
        return ("refused: it holds pickled Python objects besides tensors, and loading those could run code from the "
                "file; use a checkpoint saved as a state dict of tensors, from a source you trust")
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text.strip() else type(err).__name__


# ---------------------------------------------------------------------------------------------------------------
# Validation of output locations and flag values (before any work starts)
# ---------------------------------------------------------------------------------------------------------------


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_creatable_under(path: Path, flag: str, shown: str | os.PathLike) -> None:
    """The nearest existing ancestor of ``path`` must be a folder we may write into."""
    base = _first_existing(path)
    if not base.is_dir():
        raise UserError(f"{flag} {shown}: {base} is a file, not a folder; choose another {flag}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {shown}: cannot create files in {base} (permission denied); choose another {flag}")


def check_output(path: str | os.PathLike, flag: str, folder: bool = False) -> Path:
    """Check, before any work starts, that ``path`` can be written: an existing writable file (or folder when
    ``folder``), or creatable (its nearest existing ancestor is a folder we may write into). Creates nothing.

    Args:
        path: the output file, or folder when ``folder``.
        flag: the flag that names it (every error names it).
        folder: whether ``path`` is an output folder.

    Returns:
        ``path`` as a Path.
    """
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a folder; choose another {flag}")
    if not folder and p.is_dir():
        raise UserError(f"{flag} {path}: is a folder; name a file")
    if not folder and p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{flag} {path}: not writable (permission denied); choose another {flag}")
    _check_creatable_under(p if folder else p.parent, flag, path)
    return p


@contextlib.contextmanager
def output_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Create ``folder`` (and missing parents) for a run; if the run then fails, remove the folders this created
    that are still empty, so that a refused run leaves nothing behind.

    Args:
        folder: the folder a run writes into.
    """
    folder = Path(folder)
    missing, p = [], Path(os.path.abspath(folder))
    while not p.exists():
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for d in missing:  # the deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def flags_given(parser: "argparse.ArgumentParser", argv: Optional[Sequence[str]]) -> set[str]:
    """The destinations of the options ``argv`` gives explicitly (a flag given at its default value counts).

    Args:
        parser: the CLI's parser.
        argv: its arguments (None: ``sys.argv[1:]``).
    """
    import argparse

    unset = object()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=namespace)
    return {name for name, value in vars(namespace).items() if value is not unset}


def check_number(flag: str, value: Optional[float], low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Refuse a flag value that is not a finite number in [low, high] (an end is excluded when ``*_open``).

    Args:
        flag: the flag, e.g. ``"--sigma"`` (named in the error).
        value: its value; None (flag not given) passes.
        low: smallest allowed value (None: no bound).
        high: largest allowed value (None: no bound).
        low_open: exclude ``low`` itself.
        high_open: exclude ``high`` itself.
    """
    if value is None:
        return
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        bounds = ([] if low is None else [f"{'>' if low_open else '>='} {low:g}"]) + \
                 ([] if high is None else [f"{'<' if high_open else '<='} {high:g}"])
        wanted = "a finite number"
        if bounds:
            wanted += " " + " and ".join(bounds)
        raise UserError(f"{flag} {value}: must be {wanted}")




@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a (possibly single-process) ``torchrun`` launch."""

    rank: int
    world_size: int
    local_rank: int
    device: "torch.device"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Initialise torch.distributed from ``torchrun``'s environment (RANK, WORLD_SIZE, LOCAL_RANK).

    NCCL on CUDA (one GPU per local rank), gloo on CPU. Without those variables: a single process.
    """
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def barrier() -> None:
    """``dist.barrier()`` when distributed, else nothing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup_distributed() -> None:
    """Destroy the process group if one was created."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """Temporarily set the number of intra-op CPU threads (``None`` leaves it alone)."""
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
