"""Generation: one turn of interleaved text and images, decoded with a KV cache (``Chat`` for conversations,
``generate_batch`` for many prompts at once). docs/architecture.md follows one turn through these files."""

from ..settings import GenerationSettings
from .decoding import StepState
from .engine import (
    Chat,
    Event,
    GenerationOutput,
    ImagePending,
    ImageResult,
    Notice,
    TextDelta,
    TurnEnd,
    check_settings,
    context_length,
    generate_batch,
    image_token_states,
)
from .prompt import ImageSegment, TokenIds, Turn

__all__ = [
    "Chat", "Event", "GenerationOutput", "GenerationSettings", "ImagePending", "ImageResult", "ImageSegment",
    "Notice", "StepState", "TextDelta", "TokenIds", "Turn", "TurnEnd", "check_settings", "context_length",
    "generate_batch", "image_token_states",
]
