"""Weights of the trained layers: this project's format, and import of the published FROMAGe / GILL files.

Native format: a directory with ``config.json`` (a ModelConfig) and ``model.safetensors`` holding only the
trained layers, under the parameter names of ``GroundedLM``. Published format (see shared FORMATS.md):
``pretrained_ckpt.pth.tar`` = ``{'state_dict': {...}}`` + ``model_args.json`` (+ GILL's
``decision_model.pth.tar``). Both are checked strictly: every missing, unexpected or mis-shaped tensor is named.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError, ModelConfig
from .typed_json import JSONValue

if TYPE_CHECKING:
    from .model import GroundedLM

logger = logging.getLogger(__name__)
T = TypeVar("T")

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PUBLISHED_CKPT = "pretrained_ckpt.pth.tar"
PUBLISHED_ARGS = "model_args.json"
PUBLISHED_DECISION = "decision_model.pth.tar"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names every offending tensor."""


# ------------------------------------------------------------------------------------------ strict loading


def load_trained_layers(
    model: GroundedLM, state_dict: dict[str, torch.Tensor], *, source: str, names: dict[str, str] | None = None
) -> None:
    """Copy ``state_dict`` into the model's trained layers, refusing any missing, unexpected or mis-shaped tensor.
    ``names`` maps our key -> the key as the file spells it, for messages about published checkpoints."""
    names = names or {}
    expected = model.trained_parameters()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    problems = []
    if missing:
        problems.append("missing: " + ", ".join(names.get(k, k) for k in missing))
    if unexpected:
        problems.append("unexpected: " + ", ".join(names.get(k, k) for k in unexpected))
    for k in sorted(set(expected) & set(state_dict)):
        if tuple(state_dict[k].shape) != tuple(expected[k].shape):
            problems.append(
                f"tensor {names.get(k, k)} has shape {tuple(state_dict[k].shape)} in the checkpoint but "
                f"{tuple(expected[k].shape)} in the model (check the config: widths, n_visual_tokens, image tokens)"
            )
    if problems:
        raise CheckpointError(f"{source} does not fit {model.config.name}: " + "; ".join(problems))
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(state_dict[k].to(device=p.device, dtype=p.dtype))


# ------------------------------------------------------------------------------------------ native


def save_native(model: GroundedLM, directory: str | Path, config: ModelConfig | None = None) -> Path:
    """Write config.json + model.safetensors atomically (temporary names, then rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(config or model.config, weights=".", weights_format="native")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.trained_state_dict().items()}
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config.to_dict(), indent=2) + "\n"))
    return directory


def read_native(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


_UMASK = os.umask(0o022)  # read once, at import (reading it means setting it; later threads must not race that)
os.umask(_UMASK)


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a temporary file next to ``path``, then rename it over ``path``: a reader never sees a
    half-written file and a crash leaves the old one. The file gets the usual umask permissions (mkstemp's are
    owner-only, which would hide shared checkpoints from other users)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------------ published


def safe_torch_load(path: str | Path) -> Any:  # whatever the pickle holds (dicts of tensors, in our files)
    """``torch.load(weights_only=True)`` on CPU; a pickle holding code is refused, never loaded unsafely."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} was refused by torch.load(weights_only=True): it holds Python objects other than tensors "
            f"({str(e).splitlines()[0] if str(e) else 'unsupported global'}). This project never falls back to "
            f"unsafe loading. If you trust the file, re-save just its tensors: "
            f"torch.save({{'state_dict': torch.load(p, weights_only=False)['state_dict']}}, p2)"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({e})") from None


# (published prefix, our prefix); exact keys when the prefix has no trailing dot.
_FROMAGE_KEYS = [
    ("model.visual_embeddings.", "visual_embeddings."),
    ("model.visual_fc.", "visual_fc."),
    ("model.text_hidden_fcs.0.0.", "text_fc."),
    ("model.logit_scale", "logit_scale"),
    ("ret_input_embeddings.weight", "image_token_embeddings"),
]
_GILL_KEYS = [
    ("model.input_embeddings.weight", "image_token_embeddings"),
    ("model.visual_embeddings.", "visual_embeddings."),
    ("model.visual_fc.", "visual_fc."),
    ("model.ret_text_hidden_fcs.0.model.", "text_fc."),
    ("model.gen_text_hidden_fcs.0.fc.", "mapper.fc."),
    ("model.gen_text_hidden_fcs.0.query_embs", "mapper.query_embs"),
    ("model.gen_text_hidden_fcs.0.tfm.", "mapper.tfm."),
    ("model.gen_text_hidden_fcs.0.model.", "mapper.out."),
    ("model.logit_scale", "logit_scale"),
]
# Keys some releases carry that hold nothing we train: the frozen backbones, and FROMAGe's full resized
# embedding matrix (only its [RET] row differs from OPT's, and that row is ret_input_embeddings).
_IGNORED = {
    "fromage": ("model.lm.", "model.visual_model.", "model.input_embeddings.weight"),
    "gill": ("model.lm.", "model.visual_model."),
}


def map_published(state_dict: dict[str, torch.Tensor], kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Published key names -> ours. Returns (mapped tensors, our name -> published name). Keys that match no rule
    are kept under their published name so the strict check reports them as unexpected."""
    table = _FROMAGE_KEYS if kind == "fromage" else _GILL_KEYS
    mapped, names = {}, {}
    for key, value in state_dict.items():
        if key.startswith(_IGNORED[kind]):
            continue
        ours = key
        for theirs, mine in table:
            if key == theirs or (theirs.endswith(".") and key.startswith(theirs)):
                ours = mine + key[len(theirs) :]
                break
        mapped[ours], names[ours] = value, key
    # The reverse names for keys the file lacks, so "missing" speaks the published names too.
    return mapped, names


def published_names(model: GroundedLM, kind: str) -> dict[str, str]:
    table = _FROMAGE_KEYS if kind == "fromage" else _GILL_KEYS
    out = {}
    for ours in model.trained_parameters():
        for theirs, mine in table:
            if ours == mine or (mine.endswith(".") and ours.startswith(mine)):
                out[ours] = theirs + ours[len(mine) :]
                break
        if ours.startswith("decision."):
            out[ours] = f"{PUBLISHED_DECISION}:{ours[len('decision.') :]}"
    return out


def read_published(directory: Path, model: GroundedLM) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    kind = model.config.kind
    ckpt = safe_torch_load(directory / PUBLISHED_CKPT)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(
            f"{directory / PUBLISHED_CKPT} has no 'state_dict' dict; is it a FROMAGe/GILL checkpoint?"
        )
    state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    mapped, names = map_published(state, kind)
    names = {**published_names(model, kind), **names}
    if model.decision is not None:
        decision_path = directory / PUBLISHED_DECISION
        if decision_path.is_file():
            for k, v in read_decision_model(decision_path).items():
                mapped[f"decision.{k}"] = v
        else:
            raise CheckpointError(
                f"{decision_path} not found: without it GILL's decision head has random weights and would choose "
                f"between retrieving and generating at random. Put the published {PUBLISHED_DECISION} beside "
                f"{PUBLISHED_CKPT} (both are in the jykoh/gill repo), or run without a decision head: "
                f"load_pipeline(..., decision_model=False), or --no-decision-model on the command line and in the "
                f"app; every image then follows the mode setting (auto: retrieve when an index is loaded, else "
                f"generate)"
            )
    return mapped, names


def read_decision_model(path: str | Path) -> dict[str, torch.Tensor]:
    """GILL's ``decision_model.pth.tar``: ``{'state_dict': {'1.weight': (2, d), '1.bias': (2,)}}`` (saved on cuda)."""
    ckpt = safe_torch_load(path)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict with a 'state_dict', got {type(ckpt).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    wanted = {"1.weight", "1.bias"}
    if set(state) != wanted:
        raise CheckpointError(f"{path}: expected keys {sorted(wanted)}, got {sorted(state)}")
    return state


def config_from_published_args(args: dict[str, JSONValue], base: ModelConfig) -> ModelConfig:
    """Apply a published ``model_args.json`` to a preset. Backbone names are taken from ``base``: a user who
    passes local paths keeps them. Legacy fields (task, input_prompt, use_pooler, ...) are ignored."""

    def need(key: str, typ: type[T]) -> T:
        if key not in args:
            raise ConfigError(f"model_args.json lacks {key!r}")
        value = args[key]
        if not isinstance(value, typ) or isinstance(value, bool):
            raise ConfigError(f"model_args.json field {key!r} must be {typ.__name__}, got {value!r}")
        return value

    changes: dict[str, object] = {"n_visual_tokens": need("n_visual_tokens", int)}
    if base.kind == "gill":
        changes["retrieval_dim"] = need("ret_emb_dim", int)
        r = need("num_tokens", int)
        changes["image_tokens"] = tuple(f"[IMG{i}]" for i in range(r))
        assert base.mapper is not None, "a GILL preset has a mapper (ModelConfig checks it)"
        mapper = dataclasses.replace(
            base.mapper, num_queries=need("num_clip_tokens", int), out_dim=need("gen_emb_dim", int)
        )
        changes["mapper"] = mapper
        if args.get("text_fc_mode", "gill_mapper") != "gill_mapper":
            raise ConfigError(f"model_args.json: text_fc_mode {args['text_fc_mode']!r} is not supported (gill_mapper)")
    else:
        changes["retrieval_dim"] = need("shared_emb_dim", int)
    if args.get("text_emb_layers", [-1]) != [-1]:
        raise ConfigError(f"model_args.json: text_emb_layers {args['text_emb_layers']} is not supported ([-1] only)")
    return dataclasses.replace(base, **changes)
