"""Devices, autocast precision, TF32 and cuDNN settings, device models and CPU threads: where and in which dtype a run
computes.

torch is imported lazily so that light scripts (analyze.py) start fast.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from runkit.errors import UserError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16", "fp16")
PRECISION_CHOICES = ("auto",) + PRECISIONS  # what the CLIs' --precision accepts; see resolve_precision


def resolve_device(device: Optional[str] = None, flag: str = "--device") -> torch.device:
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


def precision_dtype(precision: str) -> torch.dtype:
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
    tens of times slower than fp32 (README, "Performance"). False where /proc/cpuinfo does not exist (e.g. macOS):
    fp32 is the safe choice.

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


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: CUDA with bf16 support (Ampere+), or :func:`cpu_has_native_bf16`."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def matmul_rate(dtype: torch.dtype, size: int = 256, repeats: int = 3) -> float:
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


def resolve_precision(precision: str, device: torch.device, flag: str = "--precision") -> str:
    """The autocast precision a run uses: ``auto`` -> bf16 where ``device`` computes it natively (:func:`native_bf16`),
    else fp16 on CUDA, else fp32. An explicit bf16 on a CPU without native bf16 is kept, with one warning per process
    stating the measured cost (a 256-cube matmul probe, bf16 against fp32); on a CUDA GPU without native bf16
    (``torch.cuda.is_bf16_supported(including_emulation=False)`` false: before Ampere) with a one-line warning.

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
    if precision == "bf16" and device.type == "cuda" and not native_bf16(device) and "bf16-cuda" not in _WARNED:
        _WARNED.add("bf16-cuda")
        warnings.warn(f"{flag} bf16: {torch.cuda.get_device_name(device)} has no native bf16 (CUDA before Ampere); "
                      "torch emulates it, slower than fp16; use --precision auto (fp16 here)", stacklevel=2)
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16() and "bf16" not in _WARNED:
        _WARNED.add("bf16")
        slow, fast = matmul_rate(torch.bfloat16), matmul_rate(torch.float32)
        warnings.warn(f"{flag} bf16: this CPU has no native bf16 (no avx512_bf16/amx_bf16 flag); a bf16 matmul ran "
                      f"at {slow:.1f} GFLOP/s against {fast:.1f} in fp32 here, so bf16 is likely slower than fp32; "
                      "use --precision auto (fp32 here)", stacklevel=2)
    return precision


def autocast(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """Autocast context for ``precision`` on ``device``; a no-op for fp32 (results are then exact fp32)."""
    import torch

    dtype = precision_dtype(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# --tf32: which fp32 work CUDA GPUs from Ampere on may compute in TF32 (10-bit mantissa products, fp32 sums), as
# (cuDNN convolutions, matrix multiplies). "conv" is torch's default, under which the paper's code ran (PyTorch 2.2;
# it sets no TF32 flag): the UNet's convolutions in TF32, the ViT's matmuls in fp32. "off": fp32 throughout (what
# --precision fp32 means elsewhere). No effect on CPUs or older GPUs. Autocast (bf16/fp16) work is not fp32 work.
TF32_MODES = {"conv": (True, False), "on": (True, True), "off": (False, False)}
DEFAULT_TF32 = "conv"


@contextlib.contextmanager
def cuda_math(tf32: str = DEFAULT_TF32, cudnn_benchmark: bool = False, flag: str = "--tf32") -> Iterator[None]:
    """Inside the block: TF32 as ``tf32`` says (:data:`TF32_MODES`) and cuDNN's autotuner (``cudnn.benchmark``) on or
    off; the previous settings are restored afterwards. The one place a run sets them.

    Args:
        tf32: ``conv`` (torch's default), ``on`` or ``off``.
        cudnn_benchmark: let cuDNN time its convolution algorithms for each new shape and keep the fastest (the
            choice may differ between processes, and with it the last bits of a convolution).
        flag: the flag named in errors.
    """
    import torch

    if tf32 not in TF32_MODES:
        raise UserError(f"{flag} {tf32!r}: choose one of {', '.join(TF32_MODES)}")
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    old = (cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark)
    (cudnn.allow_tf32, matmul.allow_tf32), cudnn.benchmark = TF32_MODES[tf32], bool(cudnn_benchmark)
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark = old


def cpu_model(cpuinfo: Optional[str] = None) -> str:
    """The CPU's model name (/proc/cpuinfo's ``model name``, else ``platform.processor()``, else ``unknown``).

    Args:
        cpuinfo: the text of /proc/cpuinfo (tests pass their own); None reads the file.
    """
    import platform

    if cpuinfo is None:
        with contextlib.suppress(OSError):
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    for line in (cpuinfo or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def device_model(device: torch.device) -> dict[str, Any]:
    """What ``device`` is, as a sidecar records it: CUDA: ``name``, ``sm_count`` (streaming multiprocessors) and
    ``capability``; CPU: ``name`` (:func:`cpu_model`); others: the type only.

    CUDA's ``randn`` depends on the model: its launch grid, and with it which Philox counter produces which element,
    follows the SM count, so one seed gives an A100 and an H100 different noise. The CPU generator gives the same
    stream on every CPU (its model is recorded for information only). See :func:`stream_difference`.

    Args:
        device: the run's device.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "sm_count": int(props.multi_processor_count),
                "capability": f"{props.major}.{props.minor}"}
    if device.type == "cpu":
        return {"type": "cpu", "name": cpu_model()}
    return {"type": device.type}


def describe_device_model(model: dict[str, Any]) -> str:
    """``cuda NVIDIA A100-SXM4-80GB (108 SMs)``, ``cpu AMD EPYC 9R14``, ``cuda`` for a :func:`device_model`."""
    text = " ".join(str(model[k]) for k in ("type", "name") if model.get(k))
    return text + (f" ({model['sm_count']} SMs)" if model.get("sm_count") is not None else "")


def stream_difference(a: dict[str, Any], b: dict[str, Any]) -> Optional[str]:
    """Why one seed may give other noise on device model ``b`` than on ``a`` (:func:`device_model`; a record of the
    type only, from an older sidecar, compares by type): another device type, or another CUDA model or SM count.
    None when the streams are the same (e.g. two CPU models).

    Args:
        a, b: the two device models.
    """
    if a.get("type") != b.get("type"):
        return "the CPU and CUDA generators give different streams"
    if a.get("type") == "cuda" and "name" in a and "name" in b and (
            (a["name"], a.get("sm_count")) != (b["name"], b.get("sm_count"))):
        return "CUDA's randn depends on the GPU model: its launch grid follows the SM count"
    return None


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
