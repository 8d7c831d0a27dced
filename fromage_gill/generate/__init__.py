"""Generation: one turn of interleaved text and images, decoded with a KV cache (``Chat`` for conversations,
``generate_batch`` for many prompts at once). docs/architecture.md follows one turn through these files."""

from ..settings import GenerationSettings
from .batch import generate_batch
from .chat import Chat
from .decoding import StepState
from .events import Event, GenerationOutput, ImagePending, ImageProgress, ImageResult, Notice, TextDelta, TurnEnd
from .limits import check_settings, context_length
from .prompt import Decision, ImageSegment, TokenIds, Turn
from .resolve import image_token_states

__all__ = [
    "Chat",
    "Decision",
    "Event",
    "GenerationOutput",
    "GenerationSettings",
    "ImagePending",
    "ImageProgress",
    "ImageResult",
    "ImageSegment",
    "Notice",
    "StepState",
    "TextDelta",
    "TokenIds",
    "Turn",
    "TurnEnd",
    "check_settings",
    "context_length",
    "generate_batch",
    "image_token_states",
]
