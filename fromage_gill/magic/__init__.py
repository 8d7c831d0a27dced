"""MAGIC ("Language Models Can See", Su et al. 2022): an unmodified LM steered by CLIP, and SimCTG adaptation.

No layer is trained: any causal LM, any full CLIP. Two ways in: a plain LM + CLIP (``load_magic("magic-mscoco")``
-> ``MagicModel.generate(images)``), or a FROMAGe/GILL pipeline guided by the conversation's images
(``attach_clip(pipeline, source)`` then the generation engine's ``decoding="magic"``; contrastive search needs no
CLIP).

    search.py   the rule (degeneration penalty, CLIP term) and the KV-cached loop, ``magic_search``
    clip.py     ``ClipGuide`` (the full CLIP that scores candidate texts), ``load_clip``, ``attach_clip``
    model.py    ``MagicModel``: a plain LM + CLIP, ``load_magic``
    simctg.py   SimCTG fine-tuning of the LM on captions (``fromage-gill train-lm``)
"""

from .clip import ClipGuide, attach_clip, attached_clip, load_clip
from .model import MagicModel, MagicResult, load_magic
from .search import (
    LMStep,
    continuation_ids,
    degeneration_penalty,
    grounded_step,
    hf_step,
    magic_scores,
    magic_search,
    resolve_decoding,
)

__all__ = [
    "ClipGuide",
    "LMStep",
    "MagicModel",
    "MagicResult",
    "attach_clip",
    "attached_clip",
    "continuation_ids",
    "degeneration_penalty",
    "grounded_step",
    "hf_step",
    "load_clip",
    "load_magic",
    "magic_scores",
    "magic_search",
    "resolve_decoding",
]
