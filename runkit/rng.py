"""The global random number generators of a process: seeding them, and their states as ``weights_only``-loadable
values, so that a checkpoint can hold every rank's state and a resumed run continue each stream where it stopped."""
from __future__ import annotations

import random
from typing import Any, Dict, List

import numpy as np
import torch
import torch.distributed as dist


def rng_state(device: torch.device) -> Dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, numpy, python) as tensors/lists (``weights_only``-loadable).

    Args:
        device: the device whose CUDA generator is included (none on CPU).
    """
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    """Restore the RNG states of :func:`rng_state`.

    Args:
        state: what :func:`rng_state` returned.
        device: the CUDA generator's device (ignored on CPU).
    """
    torch.set_rng_state(state["torch"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs (torch's on every device).

    Args:
        seed: the seed (numpy takes it modulo 2**32).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def gather_rng_states(device: torch.device) -> List[Dict[str, Any]]:
    """Every rank's RNG state (a list indexed by rank; a collective when distributed).

    Args:
        device: this process's device (:func:`rng_state`).
    """
    state = rng_state(device)
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in state.items()})
    return states
