"""A training run's resume state (optimizer, schedule, step, random generators) stored without pickled code.

Every file is written with ``torch.save`` of tensors, numbers, strings and containers only, so it loads with
``torch.load(weights_only=True)``: a checkpoint folder from someone else cannot run code when resumed. Files of
the older format (numpy's random state pickled as an ``ndarray``), or anything else ``weights_only`` refuses, load
only behind an explicit ``trust_pickle=True`` (``--trust-pickle``), with a warning. Both ``fromage-gill train`` and
``fromage-gill train-lm`` resume through here.
"""

from __future__ import annotations

import logging
import pickle
import random
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)


class UnsafeStateError(ValueError):
    """A resume file that only a full (code-running) unpickle could read, without ``--trust-pickle``."""


def save_state(state: dict, path: Path) -> None:
    """``torch.save`` a dict that ``load_state`` reads back with ``weights_only=True``."""
    torch.save(state, path)


def load_state(path: Path, *, trust_pickle: bool = False) -> dict:
    """The dict in ``path``, loaded with ``weights_only=True``; a file that needs more is refused unless
    ``trust_pickle``, and then loaded with ``weights_only=False`` (which can run code) and a warning."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise UnsafeStateError(
                f"--resume: {path} holds Python objects beyond tensors, numbers and containers, so only a full "
                f"unpickle could read it, and unpickling can run arbitrary code. A checkpoint written by an older "
                f"fromage-gill looks like this; if you wrote this one yourself, resume with --trust-pickle "
                f"(trust_pickle=True) and the next checkpoint is saved in the safe format. Never pass it for a "
                f"checkpoint folder you did not make. ({str(e).splitlines()[0]})"
            ) from None
        logger.warning("--trust-pickle: loading %s with weights_only=False; this runs any code the file holds", path)
        state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict):
        raise ValueError(f"--resume: {path} holds a {type(state).__name__}, not a resume state dict")
    return state


def get_rng() -> dict:
    """Every random generator a training step draws from, as plain data (numpy's key as an int64 tensor)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "name": str(name),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng(state: dict) -> None:
    """Restore what ``get_rng`` saved (or a trusted file of the older format, numpy's state as a tuple)."""
    random.setstate(_python_state(state["python"]))
    np_state = state["numpy"]
    if isinstance(np_state, dict):
        key = np.asarray(np_state["key"].numpy(), dtype=np.uint32)
        np_state = (np_state["name"], key, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"])
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state(s) -> tuple:
    # random.setstate wants tuples; a weights_only load returns them as saved, but be lenient with lists
    version, internal, gauss = s
    return int(version), tuple(int(x) for x in internal), None if gauss is None else float(gauss)
