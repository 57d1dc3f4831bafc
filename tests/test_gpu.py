"""What a GPU run depends on, checked on the CPU with stand-ins for torch.cuda: the cuda test marker, torchrun's GPU per
local rank and collective timeout, TF32 and cuDNN settings, bf16 without native support, device models; the tests
marked cuda check the same on a real GPU (deselected elsewhere)."""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import conftest
import pytest
import torch

import fast
from runkit import devices, distributed
from runkit.devices import cuda_math, device_model, stream_difference
from runkit.errors import UserError

REPO = Path(__file__).resolve().parents[1]
A100 = {"type": "cuda", "name": "NVIDIA A100-SXM4-80GB", "sm_count": 108, "capability": "8.0"}
H100 = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "sm_count": 132, "capability": "9.0"}


# --------------------------------------------------------------------------------------------------- the cuda marker


class _Item:
    def __init__(self, name: str, *markers: str):
        self.name, self.markers = name, markers

    def get_closest_marker(self, name: str):
        return name if name in self.markers else None


def test_cuda_tests_are_deselected_without_cuda_and_kept_with_it(monkeypatch):
    reported = []
    config = types.SimpleNamespace(hook=types.SimpleNamespace(pytest_deselected=lambda items: reported.extend(items)))
    items = [_Item("a"), _Item("b", "cuda"), _Item("c", "slow", "cuda"), _Item("d", "slow")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    kept = list(items)
    conftest.pytest_collection_modifyitems(config, kept)
    assert [i.name for i in kept] == ["a", "d"] and [i.name for i in reported] == ["b", "c"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kept, reported[:] = list(items), []
    conftest.pytest_collection_modifyitems(config, kept)
    assert kept == items and reported == []


@pytest.mark.slow
def test_the_suite_reports_cuda_tests_as_deselected_not_skipped(tmp_path):
    """A real pytest run of a cuda test beside a plain one, with this suite's conftest and markers."""
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    (tmp_path / "test_x.py").write_text("import pytest\n\n@pytest.mark.cuda\ndef test_gpu():\n    assert False\n\n"
                                        "def test_cpu():\n    pass\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--strict-markers", "-m",
                           "", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    if torch.cuda.is_available():
        assert "1 failed, 1 passed" in proc.stdout, proc.stdout
    else:
        assert proc.returncode == 0 and "1 passed, 1 deselected" in proc.stdout and "skipped" not in proc.stdout, (
            proc.stdout + proc.stderr)


# ------------------------------------------------------------------------------------ torchrun: timeout, GPU per rank


def _fake_torchrun(monkeypatch, local_rank: int, local_world: int, gpus: int = 0) -> dict:
    """torchrun's environment for one local rank (node of ``local_world`` ranks, 2 nodes), ``gpus`` stand-in CUDA
    devices; returns what init_process_group was called with."""
    env = {"WORLD_SIZE": str(2 * local_world), "RANK": str(local_world + local_rank), "LOCAL_RANK": str(local_rank),
           "LOCAL_WORLD_SIZE": str(local_world)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    called: dict = {}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: called.update(kw))
    if gpus:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: called.setdefault("set_device", device))
    return called


def test_the_collective_timeout_reaches_init_process_group(monkeypatch):
    called = _fake_torchrun(monkeypatch, 0, 2)
    info = distributed.init_distributed("cpu", 90.0)
    assert called == {"backend": "gloo", "timeout": datetime.timedelta(minutes=90)}
    assert (info.rank, info.world_size, info.device.type) == (2, 4, "cpu")
    called.clear()
    distributed.init_distributed("cpu")
    assert called["timeout"] == datetime.timedelta(hours=24) == datetime.timedelta(
        minutes=distributed.DEFAULT_DIST_TIMEOUT_MINUTES)


def test_device_cuda_n_under_torchrun_is_the_first_gpu_of_the_nodes_ranks(monkeypatch):
    called = _fake_torchrun(monkeypatch, 1, 2, gpus=4)
    assert distributed.init_distributed("cuda:2").device == torch.device("cuda", 3)
    assert called["set_device"] == torch.device("cuda", 3) and called["backend"] == "nccl"
    assert distributed.init_distributed("cuda").device == torch.device("cuda", 1)
    assert distributed.init_distributed(None).device == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"^--device cuda:3: under torchrun local rank r uses cuda:3\+r, but 2 local "
                                        r"ranks from cuda:3 need 5 GPUs and this node has 4; use --device cuda"):
        distributed.init_distributed("cuda:3")
    _fake_torchrun(monkeypatch, 4, 5, gpus=4)  # more local ranks than GPUs: no two ranks on one GPU
    with pytest.raises(UserError, match=r"5 local ranks from cuda:0 need 5 GPUs and this node has 4"):
        distributed.init_distributed("cuda")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):  # one process: cuda:N is cuda:N
        monkeypatch.delenv(key)
    assert distributed.init_distributed("cuda:3").device == torch.device("cuda", 3)
    assert distributed.init_distributed("cuda").device == torch.device("cuda", 0)


# ------------------------------------------------------------------------------------------ TF32, cuDNN, bf16, layout


@pytest.fixture
def cuda_flags():
    """torch's TF32 and cudnn.benchmark flags, restored after the test (they are process-wide)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark
    yield
    cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark = saved


@pytest.mark.parametrize("mode, conv, matmul", [("conv", True, False), ("on", True, True), ("off", False, False)])
def test_tf32_and_cudnn_benchmark_are_set_inside_and_restored_after(cuda_flags, mode, conv, matmul):
    cudnn, cublas = torch.backends.cudnn, torch.backends.cuda.matmul
    for before in (False, True):
        cudnn.allow_tf32, cublas.allow_tf32, cudnn.benchmark = before, not before, before
        with pytest.raises(RuntimeError, match="inside"):
            with cuda_math(mode, cudnn_benchmark=not before):
                assert (cudnn.allow_tf32, cublas.allow_tf32, cudnn.benchmark) == (conv, matmul, not before)
                raise RuntimeError("inside")
        assert (cudnn.allow_tf32, cublas.allow_tf32, cudnn.benchmark) == (before, not before, before)
    with pytest.raises(UserError, match=r"^--tf32 'fast': choose one of conv, on, off$"):
        with cuda_math("fast"):
            pass


def test_bf16_on_a_gpu_without_native_bf16_warns_in_one_line(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(devices, "_WARNED", set())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert devices.resolve_precision("auto", cuda) == "fp16"
        assert devices.resolve_precision("bf16", cuda) == "bf16"
        assert devices.resolve_precision("bf16", cuda) == "bf16"
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert str(caught[0].message).startswith("--precision bf16: Tesla V100-SXM2-32GB has no native bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere on
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert devices.resolve_precision("auto", cuda) == "bf16" == devices.resolve_precision("bf16", cuda)
    assert caught == []


def test_channels_last_by_default_on_cpu_only(monkeypatch):
    from denoiser import build_denoiser

    assert fast.channels_last_default(torch.device("cpu")) and not fast.channels_last_default(torch.device("cuda:1"))
    assert fast.prepare_inference_(build_denoiser("digits"), "bf16").channels_last
    assert not fast.prepare_inference_(build_denoiser("digits"), "bf16", channels_last=False).channels_last
    monkeypatch.setattr(fast, "channels_last_default", lambda device: False)  # as on CUDA
    assert not fast.prepare_inference_(build_denoiser("digits"), "bf16").channels_last


# --------------------------------------------------------------------------------------------------- device models

CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14 96-Core Processor\nflags\t: fpu\n"


def test_device_models_and_which_differences_change_the_noise(monkeypatch):
    assert devices.cpu_model(CPUINFO) == "AMD EPYC 9R14 96-Core Processor"
    assert device_model(torch.device("cpu")) == {"type": "cpu", "name": devices.cpu_model()}
    props = types.SimpleNamespace(name="NVIDIA A100-SXM4-80GB", multi_processor_count=108, major=8, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert device_model(torch.device("cuda:0")) == A100
    assert devices.describe_device_model(A100) == "cuda NVIDIA A100-SXM4-80GB (108 SMs)"
    other_cpu = {"type": "cpu", "name": "Intel(R) Xeon(R) Platinum 8480+"}
    assert stream_difference(device_model(torch.device("cpu")), other_cpu) is None  # the CPU generator: one stream
    assert stream_difference(A100, dict(A100)) is None
    assert "SM count" in stream_difference(A100, H100)
    assert "SM count" in stream_difference(A100, {**A100, "sm_count": 98})
    assert "CPU and CUDA" in stream_difference(other_cpu, A100)
    assert stream_difference({"type": "cuda"}, H100) is None  # an older sidecar: the type only
    assert "CPU and CUDA" in stream_difference({"type": "cpu"}, H100)


# -------------------------------------------------------------------------------------------------- on a real GPU


@pytest.mark.cuda
def test_tf32_modes_change_an_fp32_convolution_on_ampere_and_later():
    """--tf32 off: the convolution is fp32 (error ~1e-6 of the float64 result); conv/on on Ampere+: TF32 (~1e-3)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 64, 32, 32, generator=g), torch.randn(64, 64, 3, 3, generator=g)
    exact = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    errors = {}
    for mode in ("off", "conv"):
        with cuda_math(mode):
            y = torch.nn.functional.conv2d(x.cuda(), w.cuda(), padding=1).double().cpu()
        errors[mode] = float((y - exact).abs().max() / exact.abs().max())
    assert errors["off"] < 1e-5, errors
    if torch.cuda.get_device_capability() >= (8, 0):
        assert errors["conv"] > 1e-4, errors


@pytest.mark.cuda
def test_the_device_model_of_a_real_gpu():
    model = device_model(torch.device("cuda"))
    props = torch.cuda.get_device_properties(torch.device("cuda"))
    assert model["name"] == torch.cuda.get_device_name() and model["sm_count"] == props.multi_processor_count > 0
    assert devices.resolve_precision("auto", torch.device("cuda")) == (
        "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16")


@pytest.mark.cuda
def test_torchrun_ranks_get_one_gpu_each_and_the_timeout(tmp_path):
    """A real torchrun over the GPUs (2 processes, or 1 on a one-GPU machine): rank r on cuda:r, the NCCL process
    group created with --dist_timeout's minutes; and the offset past the last GPU is refused."""
    nproc = min(2, torch.cuda.device_count())
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(REPO)!r})
        import torch.distributed as dist
        from runkit import distributed
        real = dist.init_process_group
        def spy(**kw):
            print("timeout", kw["timeout"].total_seconds(), kw["backend"], flush=True)
            real(**kw)
        dist.init_process_group = spy
        info = distributed.init_distributed("cuda:0", 90.0)
        distributed.barrier()
        print("device", info.rank, info.device, flush=True)
        distributed.cleanup_distributed()
    """))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    if nproc > 1:
        assert lines.count("timeout 5400.0 nccl") == nproc, proc.stdout
    assert sorted(line for line in lines if line.startswith("device")) == [f"device {r} cuda:{r}" for r in range(nproc)]
    env = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": str(nproc)}
    with pytest.raises(UserError, match="need"):
        distributed.local_cuda_index(torch.cuda.device_count() - nproc + 1, "cuda:x", env)


# ---------------------------------------------------------------------------------------------------- the GPU check


@pytest.mark.slow
def test_gpu_check_on_cpu_writes_every_section_and_passes(tmp_path):
    """scripts/gpu_check.sh --device cpu: exit status 0, every section in gpu_check.md, the CPU-only ones n/a, the
    training resume and certify parity passed, a bench table row per timed path."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    command = ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--device", "cpu", "--outdir", str(tmp_path)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert report.startswith("# GPU check\n") and "- result: PASS" in report
    assert f"- device: cpu ({devices.cpu_model()}); native bf16: " in report
    for title, status in (("cuda tests (`pytest -m cuda`)", "n/a (cpu)"), ("fp16 training and resume (digits)", "PASS"),
                          ("certify parity (digits)", "PASS"), ("bench: cifar10 and imagenet", "PASS"),
                          ("ImageNet memory per sample", "n/a (cpu)"),
                          ("host syncs (`torch.cuda.set_sync_debug_mode('warn')`)", "n/a (cpu)")):
        assert f". {title}: {status} (" in report, (title, report)
    assert "step log of 4 steps, resumed at step 2: identical" in report and "weights after step 4: identical" in report
    assert "fp32, batch 100 and fp32, batch 37: identical logs" in report
    assert "| cifar10 | reference fp32 (fp32) | 1 |" in report and "| cifar10 | fast fp32 (fp32) | 1 |" in report
    assert "| imagenet, TF32, bf16, fp16, compiled | n/a (cpu) |" in report


def test_gpu_check_reports_a_failing_section_and_exits_1(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import gpu_check

    def broken(check):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_check, "SECTIONS", (("fine", lambda check: ("PASS", ["- all good"])),
                                                ("broken", broken), ("after", lambda check: ("n/a (cpu)", []))))
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--device", "cpu", "--outdir", str(tmp_path)])
    assert exc.value.code == 1
    report = (tmp_path / "gpu_check.md").read_text()
    assert "- result: FAIL (broken), " in report and "## 1. fine: PASS (" in report and "- all good" in report
    assert "## 2. broken: FAIL (" in report and "- RuntimeError: CUDA error: an illegal memory access" in report
    assert "## 3. after: n/a (cpu) (" in report  # the sections after a failure still run
    assert "gpu_check: FAIL (broken)" in capsys.readouterr().out
