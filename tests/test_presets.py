"""presets.py: the paper's launchers pass exactly the presets' hyper-parameters; the CLIs' defaults are the presets'."""
from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

import certification
import presets
import training
from denoiser import build_denoiser
from presets import CIFAR10, DIGITS, IMAGENET, PRESETS, TRAIN_DEFAULTS
from training import TrainConfig

REPO = Path(__file__).resolve().parents[1]
# train.py flags whose TrainPreset attribute has another name (the rest: the flag's name, dashes as underscores)
PRESET_NAME = {"train_noise_sd": "noise_sd", "test_noise_sd": "noise_sd"}


def _shell_variables(text: str) -> dict[str, list[str]]:
    """The launcher's assignments: ``A=1 B=2`` lines and ``ARR=(...)`` arrays, each as its list of words."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        array = re.fullmatch(r"([A-Z_]+)=\((.*)\)", line.strip())
        if array:
            found[array.group(1)] = shlex.split(array.group(2))
        elif re.fullmatch(r"([A-Z_]+=\S+\s*)+", line.strip()):
            found.update({k: [v] for k, v in (word.split("=", 1) for word in shlex.split(line))})
    return found


def _expand(word: str, variables: dict[str, list[str]]) -> list[str]:
    match = re.fullmatch(r"\$\{?(\w+)(\[@\])?\}?", word)
    return variables.get(match.group(1), [word]) if match else [word]


def launcher_flags(script: str) -> dict[str, str]:
    """The train.py flags (name -> value) that ``script`` passes: its variables and arrays put into the train.py
    command of scripts/launch_train.sh (``CMD=(... train.py ...)``)."""
    variables = _shell_variables((REPO / script).read_text())
    launch = (REPO / "scripts" / "launch_train.sh").read_text()
    command = re.search(r"^CMD=\((.*?)\)$", launch, re.S | re.M).group(1)
    words = shlex.split(command.split("train.py", 1)[1])
    words = [w for word in words for w in _expand(word, variables)]
    flags = {}
    for flag, value in zip(words, words[1:] + [""]):
        if flag.startswith("--") and value and not value.startswith("--"):
            flags[flag[2:].replace("-", "_")] = value
    return flags


def _as_preset_value(text: str, like: object) -> object:
    if isinstance(like, bool):
        return {"true": True, "false": False}[text]
    return type(like)(text) if isinstance(like, (int, float)) else text


@pytest.mark.parametrize("script, preset", [("train_cifar10.sh", CIFAR10), ("train_imagenet.sh", IMAGENET)])
def test_launchers_pass_the_presets(script, preset):
    """Every flag of the launcher's train.py command equals the preset's value, and every hyper-parameter of the
    preset is either passed or train.py's default."""
    flags = launcher_flags(script)
    assert flags["dataset"] == preset.name and flags["arch"] == preset.arch
    defaults = TrainConfig(dataset=preset.name)
    for field in dataclasses.fields(presets.TrainPreset):
        value = getattr(preset.train, field.name)
        given = [f for f in flags if PRESET_NAME.get(f, f) == field.name]
        if not given:
            assert getattr(defaults, field.name) == value, f"{script} leaves --{field.name} at train.py's default"
        for flag in given:
            assert _as_preset_value(flags[flag], value) == value, f"{script}: --{flag} {flags[flag]} vs {value}"
    unknown = set(flags) - {f.name for f in dataclasses.fields(TrainConfig)}
    assert not unknown, unknown


def test_launcher_parsing_sees_every_flag():
    """The parser above reads what the launcher runs (a check of the check): all its variables are used."""
    flags = launcher_flags("train_imagenet.sh")
    assert {"blr", "batch", "accum_iter", "lbd", "num_noises", "num_steps", "weight_decay", "weight_decay_end",
            "layer_decay", "train_noise_sd", "eps", "epochs", "ft_method", "clip_grad", "use_fp16"} <= set(flags)
    assert (flags["blr"], flags["batch"], flags["num_steps"], flags["ft_method"]) == ("4e-4", "16", "1", "lora")


def test_t_star_of_each_preset_is_the_denoisers():
    """t* from the preset's denoiser schedule (no UNet built): the values of METHOD §1, and the denoiser's own."""
    assert [CIFAR10.t_star(s) for s in (0.12, 0.25, 0.5, 1.0)] == [573, 1158, 1984, 2809]
    assert [IMAGENET.t_star(s) for s in (0.12, 0.25, 0.5, 1.0)] == [70, 145, 259, 396]
    den = build_denoiser(DIGITS.denoiser)
    assert [DIGITS.t_star(s) for s in (0.25, 0.5)] == [den.timestep_for_sigma(s) for s in (0.25, 0.5)]


def test_train_defaults_read_the_presets():
    """train.py's flags default to the paper's train.py (TRAIN_DEFAULTS); --lbd left out is the dataset's lambda."""
    defaults = TrainConfig(dataset="cifar10")
    for field in dataclasses.fields(presets.TrainPreset):
        name = {"noise_sd": "train_noise_sd"}.get(field.name, field.name)
        if name != "lbd":
            assert getattr(defaults, name) == getattr(TRAIN_DEFAULTS, field.name), name
    lbds = {name: training.resolve_config(TrainConfig(dataset=name, device="cpu", outdir=None)).lbd
            for name in PRESETS}
    assert lbds == {"cifar10": 4.0, "imagenet": 2.0, "digits": 1.0}
    assert training.resolve_config(TrainConfig(dataset="cifar10", device="cpu", lbd=0.5)).lbd == 0.5
    assert training.resolve_config(TrainConfig(dataset="imagenet", device="cpu")).test_per_class == 5
    assert DIGITS.train == TRAIN_DEFAULTS  # digits has no paper values: train.py's defaults


def _certify_options(*argv: str) -> certification.RunOptions:
    args = certification.certify_parser().parse_args(["--sigma", "0.5", "--outfile", "x.tsv", *argv])
    return certification.resolve_options(certification.RunOptions.from_namespace(args))


@pytest.mark.parametrize("preset", list(PRESETS.values()), ids=list(PRESETS))
def test_certify_defaults_are_the_presets(preset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opts = _certify_options("--dataset", preset.name, "--device", "cpu", "--denoiser_ckpt", "none")
    assert (opts.N, opts.N0, opts.alpha, opts.arch, opts.subset) == (preset.N, preset.N0, preset.alpha, preset.arch,
                                                                     preset.subset)
    assert opts.skip == (preset.skip if preset.subset == "skip" else None)


def test_per_dataset_help_text():
    assert presets.per_dataset("N") == "cifar10 100000, imagenet 10000, digits 10000"
    assert presets.per_dataset("train.lbd") == "cifar10 4.0, imagenet 2.0, digits 1.0"
    with pytest.raises(dataclasses.FrozenInstanceError):
        CIFAR10.N = 1  # type: ignore[misc]
