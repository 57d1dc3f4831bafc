"""Shared helpers: user-facing errors, devices, precision, atomic files and torch.distributed.

Every script in this repository uses these, so that a bad flag, a missing file or a multi-GPU launch
behaves the same way everywhere.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

if TYPE_CHECKING:  # torch is imported lazily so that light scripts (analyze.py) start fast
    import torch

PRECISIONS = ("fp32", "bf16", "fp16")


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


def resolve_device(device: Optional[str] = None) -> "torch.device":
    """``None``/``"auto"`` -> CUDA when available, else CPU; otherwise the named device, checked to exist."""
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise UserError(f"unknown device {device!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return dev


def precision_dtype(precision: str) -> "torch.dtype":
    """Map ``fp32``/``bf16``/``fp16`` to a torch dtype."""
    import torch

    try:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    except KeyError:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}") from None


def autocast(device: "torch.device", precision: str = "fp32") -> contextlib.AbstractContextManager:
    """Autocast context for ``precision`` on ``device``; a no-op for fp32 (results are then exact fp32)."""
    import torch

    dtype = precision_dtype(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def explicit_attention_is_faster(device: "torch.device", dtype: "torch.dtype") -> bool:
    """Whether :func:`attention` takes the explicit form for ``dtype`` on ``device``: bf16 on CPU, where two oneDNN
    bf16 GEMMs and a softmax beat PyTorch's CPU flash-attention kernel at the sequence lengths certification runs
    (2-core Zen 4, [B, heads, T, 64], ms: ViT-B/16 [16, 12, 197] 23.8 -> 20.7; CIFAR-10 UNet [16, 4, 256]
    8.2 -> 5.2; CLIP ViT-B/16 at 384 px [2, 12, 577] 15.9 -> 10.9; the whole CIFAR-10 fast path +3 %). Only the
    ImageNet UNet's 28x28 level (T = 784) is slower (17.3 -> 22.5), well under 1 % of that UNet's time."""
    import torch

    return torch.device(device).type == "cpu" and dtype == torch.bfloat16


def attention(q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", scale: float) -> "torch.Tensor":
    """softmax(q kᵀ · scale) v over the last two dimensions: ``[..., T_q, d]``, ``[..., T, d]`` -> ``[..., T_q, d]``.

    ``F.scaled_dot_product_attention``, except where :func:`explicit_attention_is_faster` (bf16 on CPU): there the
    explicit ``softmax((q·scale) kᵀ) v``, the same function with the scores rounded to bf16 before the softmax (the
    flash kernel keeps them in fp32).
    """
    import torch.nn.functional as F

    if explicit_attention_is_faster(q.device, q.dtype):
        return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike, mode: str, **open_kwargs: Any) -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success fsync it and rename it onto ``path``, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: never a half-written file."""
    import torch

    with _atomic_file(path, "wb") as f:
        torch.save(obj, f)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary file beside ``path``, fsync, rename: never a half-written file."""
    with _atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)


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


def state_dict_mismatch(expected: "dict[str, Any]", given: "dict[str, Any]"
                        ) -> "tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]":
    """Compare a checkpoint's state dict with a model's: (missing keys, unexpected keys, [(key, given shape,
    expected shape)] for keys present in both with different shapes). Callers turn it into their own one-line error."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [(k, tuple(given[k].shape), tuple(v.shape)) for k, v in expected.items()
             if k in given and tuple(given[k].shape) != tuple(v.shape)]
    return missing, unexpected, wrong
