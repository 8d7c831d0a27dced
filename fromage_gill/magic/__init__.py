"""MAGIC ("Language Models Can See", Su et al. 2022): an unmodified LM steered by CLIP, and SimCTG adaptation."""

from .decoding import (
    ClipGuide,
    LMStep,
    MagicModel,
    MagicResult,
    attach_clip,
    attached_clip,
    continuation_ids,
    grounded_step,
    hf_step,
    load_clip,
    load_magic,
    magic_search,
    resolve_decoding,
)

__all__ = ["ClipGuide", "LMStep", "MagicModel", "MagicResult", "attach_clip", "attached_clip", "continuation_ids",
           "grounded_step", "hf_step", "load_clip", "load_magic", "magic_search", "resolve_decoding"]
