"""training.py: the config dataclass defines train.py's flags once; the seeds of a run; core's step 1 and eps unit."""
from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from torch import nn

import train
import training
from cadis import eps_pixels
from core import noise_and_denoise
from training import TrainConfig, config_field


def test_every_field_is_a_flag_with_the_fields_default_and_help():
    parser = train.build_parser()
    parsed = vars(parser.parse_args(["--dataset", "digits"]))
    assert parsed == dataclasses.asdict(TrainConfig(dataset="digits"))  # the same names and defaults, once
    helps = {a.dest: a.help for a in parser._actions if a.dest != "help"}
    assert set(helps) == {f.name for f in dataclasses.fields(TrainConfig)} and all(helps.values())
    assert parser.parse_args([]).dataset is None  # train() requires it for a new run (a --resume takes the run's)


def test_flag_spellings_and_bool_forms():
    args = train.build_parser().parse_args(
        ["--dataset", "cifar10", "--num-steps", "2", "--use_fp16", "true", "--warm_start", "false", "--eps_double",
         "--no_progress", "--no_tensorboard", "--lr", "0.5", "--test_noise_sd", "0.5"])
    cfg = training.config_from_args(args)
    assert (cfg.num_steps, cfg.use_fp16, cfg.warm_start, cfg.eps_double) == (2, True, False, True)
    assert (cfg.progress, cfg.tensorboard, cfg.lr, cfg.test_noise_sd) == (False, False, 0.5, 0.5)
    assert training.config_from_args(train.build_parser().parse_args(["--dataset", "x", "--num_steps", "3",
                                                                      "--use_fp16"])).use_fp16 is True


def test_adding_a_flag_is_adding_a_field():
    @dataclasses.dataclass
    class Extended(TrainConfig):
        attn_drop_rate: float = config_field(0.0, "attention dropout")
        strict: bool = config_field(True, "do not check")

    parser = argparse.ArgumentParser()
    training.add_config_arguments(parser, Extended)
    args = parser.parse_args(["--dataset", "digits", "--attn_drop_rate", "0.1", "--no_strict"])
    assert (args.attn_drop_rate, args.strict, args.epochs) == (0.1, False, 30)


def test_resolved_config_fills_dependent_defaults():
    cfg = training.resolve_config(TrainConfig(dataset="digits", use_fp16=True, ft_method="full-ft",
                                              weight_decay_end=None))
    assert (cfg.precision, cfg.ft_method, cfg.arch, cfg.test_noise_sd) == ("fp16", "full", "digits_vit_tiny", 0.25)
    assert (cfg.weight_decay_end, cfg.test_per_class) == (cfg.weight_decay, 0)
    assert cfg.outdir.endswith("lbd_1.0_eps_64_M4_seed0")


def test_run_seeds():
    assert [training.run_seed(7, "process", rank=r) for r in (0, 1)] == [7, 8]
    assert training.run_seed(7, "resume", rank=1, step=3) == 7 + 1 + 3000
    assert [training.run_seed(7, "loader", epoch=e) for e in (0, 2)] == [7 * 100003, 7 * 100003 + 2]
    assert training.run_seed(7, "sampler") == training.run_seed(7, "test") == 7
    with pytest.raises(ValueError, match="unknown seed purpose"):
        training.run_seed(7, "dropout")


class _Recorder(nn.Module):
    """A 'denoiser' that records its input and timestep and has a trainable parameter."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.seen: list = []

    def denoise(self, x: torch.Tensor, t: int) -> torch.Tensor:
        self.seen.append((x.clone(), t))
        return x * self.scale


def test_noise_and_denoise():
    x = torch.rand(2, 3, 4, 4)
    den = _Recorder()
    out = noise_and_denoise(den, x, 17, sigma=0.3, generator=torch.Generator().manual_seed(5))
    noisy = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(den.seen[0][0], noisy, rtol=0, atol=0)
    assert den.seen[0][1] == 17 and not out.requires_grad  # no gradient through D
    torch.testing.assert_close(out, noisy * 0.5)
    noise_and_denoise(den, x, 3)  # sigma 0 (DenoisedClassifier: the input is already noisy): no noise drawn
    assert torch.equal(den.seen[1][0], x)
    torch.manual_seed(1)
    plain = noise_and_denoise(None, x, None, sigma=0.25)  # no denoiser: x + delta (Cohen's smoothing)
    torch.manual_seed(1)
    torch.testing.assert_close(plain, x + 0.25 * torch.randn_like(x), rtol=0, atol=0)


def test_eps_flag_unit():
    assert eps_pixels(64) == 0.125 and eps_pixels(32) == 0.0625  # eps/256 on [-1, 1] = eps/512 on [0, 1]
