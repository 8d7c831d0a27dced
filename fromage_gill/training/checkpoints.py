"""Saving and resuming a training run's state.

    OUT/config.json, OUT/model.safetensors   the latest trained layers (``load_pipeline(OUT)``)
    OUT/checkpoints/step-0000500/            the same, plus trainer_state.pt (optimizer, scheduler, step) and
                                             rng-<rank>.pt; written as .tmp-step-... and renamed when complete

A killed run therefore always leaves its last complete checkpoint, and resuming from it restores the optimizer,
schedule, step and every process's random state. The .pt files hold only tensors, numbers and containers
(``resume_state``): resuming loads them with ``weights_only=True``, and a file that needs a full unpickle is
refused unless ``--trust-pickle``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .. import checkpoint as ckpt
from ..config import RANDOM, ModelConfig
from ..paths import checkout_path
from ..resume_state import get_rng, load_state, save_state, set_rng
from ..typed_json import JSONValue, read_json_file

if TYPE_CHECKING:
    from ..model import GroundedLM

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
BACKBONES = "backbones.json"  # what the frozen backbones were (``backbone_fingerprints``), for --resume's check
# A large file is identified by its size and this much of its start and end: a safetensors/bin file of other weights
# differs there (the header names and places the tensors; the first and last tensors' values follow), and reading
# 2 MiB per shard keeps the check instant for a 13 GB LM. Smaller files are hashed whole.
_SAMPLE_BYTES = 1 << 20


def save_checkpoint(out: Path, step: int, model: GroundedLM, optimizer, scheduler, accelerator, *, keep: int) -> Path:
    """OUT/checkpoints/step-N, complete or absent: written under a temporary name, renamed at the end. The newest
    trained layers are also copied to OUT/ (config.json + model.safetensors) so ``load_pipeline(OUT)`` works."""
    final = out / CHECKPOINTS / f"step-{step:07d}"
    tmp = out / CHECKPOINTS / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_state(get_rng(), tmp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.save_native(model, tmp)
        (tmp / BACKBONES).write_text(json.dumps(backbone_fingerprints(model.config), indent=2) + "\n")
        save_state(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step},
            tmp / TRAINER_STATE,
        )
        if final.exists():  # a re-run of the same step after a resume
            shutil.rmtree(final)
        tmp.rename(final)
        ckpt.save_native(model, out)
        done = sorted(p for p in (out / CHECKPOINTS).glob("step-*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest checkpoint)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path} is not a directory")
    if (path / TRAINER_STATE).is_file():
        return path
    found = sorted((path / CHECKPOINTS).glob("step-*")) if (path / CHECKPOINTS).is_dir() else []
    found = [p for p in found if (p / TRAINER_STATE).is_file()]
    if not found:
        raise FileNotFoundError(f"--resume {path} holds no checkpoint ({TRAINER_STATE} or {CHECKPOINTS}/step-*)")
    return found[-1]


def check_resume(resume: Path, config: ModelConfig) -> None:
    """Refuse a checkpoint written by another model than ``config`` (weights and description may differ). The
    frozen backbones are compared by what they are (``backbone_fingerprints``), not by how their path is spelled:
    ``repo:checkpoints/toy/lm`` and its absolute path, or a copy of the same files elsewhere, agree."""
    if not (resume / ckpt.CONFIG_NAME).is_file():
        raise FileNotFoundError(f"--resume {resume} has no {ckpt.CONFIG_NAME}")
    their_config = ModelConfig.from_dict(read_json_file(resume / ckpt.CONFIG_NAME))
    stored = resume / BACKBONES
    # a checkpoint of an earlier version has no backbones.json: its config's paths are fingerprinted now
    their_prints = json.loads(stored.read_text()) if stored.is_file() else backbone_fingerprints(their_config)
    ours = _comparable(config, backbone_fingerprints(config))
    theirs = _comparable(their_config, their_prints)
    diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if diff:
        raise ValueError(
            f"--resume {resume} was written by another model ({theirs.get('name')!r}, differing in "
            f"{', '.join(diff)}) than --model {config.name!r}; resume with the same --model"
        )


def backbone_fingerprints(config: ModelConfig) -> dict[str, str | None]:
    """What each frozen backbone is, whatever its path's spelling: a local file or folder (``repo:`` resolved) ->
    a hash of its files' names, sizes and contents (``_SAMPLE_BYTES`` of each end of a large file); a Hub id or
    "random" -> itself (a random backbone is its inline config, compared with the rest of the config)."""
    diffusion = config.diffusion.source if config.diffusion is not None else None
    return {
        "lm.source": _fingerprint(config.lm.source),
        "lm.tokenizer": _fingerprint(config.lm.tokenizer),
        "vision.source": _fingerprint(config.vision.source),
        "vision.pretrained": _fingerprint(config.vision.pretrained),
        "diffusion.source": _fingerprint(diffusion),
    }


def _fingerprint(source: str | None) -> str | None:
    if source is None or source == RANDOM:
        return source
    path = Path(checkout_path(source, must_exist=False))
    if not path.exists():
        return source  # a Hub id (with its revision compared in the config), or a path gone since
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        rel = f.relative_to(path).as_posix() if path.is_dir() else f.name
        if any(part.startswith(".") for part in Path(rel).parts):
            continue  # .cache/, .git/: what a download or a clone leaves, not the weights
        size = f.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= 2 * _SAMPLE_BYTES:
                h.update(fh.read())
            else:
                h.update(fh.read(_SAMPLE_BYTES))
                fh.seek(size - _SAMPLE_BYTES)
                h.update(fh.read(_SAMPLE_BYTES))
    return "sha256:" + h.hexdigest()


def check_fresh_run(out: Path) -> None:
    """Refuse to start a new run in a directory that already holds one."""
    if (out / CHECKPOINTS).is_dir() and any((out / CHECKPOINTS).iterdir()):
        raise FileExistsError(
            f"--out {out} already holds a run; pass --resume {out} to continue it, or choose a new --out"
        )


def load_trained_layers(model: GroundedLM, resume: Path) -> None:
    """The checkpoint's trained layers into ``model``."""
    ckpt.load_trained_layers(model, ckpt.read_native(resume / ckpt.WEIGHTS_NAME), source=str(resume))


def restore_trainer_state(resume: Path, optimizer, scheduler, rank: int, *, trust_pickle: bool = False) -> int:
    """Load the optimizer, scheduler and this process's random state of a checkpoint; returns its step. Every file
    is read with ``weights_only=True``; ``trust_pickle`` lets an older checkpoint's pickled state load."""
    rng_file = resume / f"rng-{rank}.pt"
    state = load_state(resume / TRAINER_STATE, trust_pickle=trust_pickle)
    rng = load_state(rng_file, trust_pickle=trust_pickle) if rng_file.is_file() else None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    step = int(state["step"])
    if rng is not None:
        set_rng(rng)
    logger.info("resumed from %s at step %d", resume, step)
    return step


def _comparable(config: ModelConfig, fingerprints: dict[str, str | None]) -> dict[str, JSONValue]:
    """The config as --resume compares it: the trained weights' place and the description left out, each backbone's
    path replaced by its fingerprint (the name is compared, so a different backbone is named in the error)."""
    d = config.to_dict()
    for k in ("weights", "weights_format", "description"):
        d.pop(k, None)
    for key, fingerprint in fingerprints.items():
        part, field = key.split(".")
        if d.get(part) is not None:
            d[part][field] = fingerprint
    return d
