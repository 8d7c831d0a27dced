"""The flags shared by the sub-commands that load a model: the app's own, defined once in ``chat/options.py``."""

from __future__ import annotations

from ..chat.options import add_model_args, load_from_args, pipeline_kwargs

__all__ = ["add_model_args", "load_from_args", "pipeline_kwargs"]
