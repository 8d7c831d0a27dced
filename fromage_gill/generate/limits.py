"""What a pipeline can serve: its context length, which image paths a mode has, and the errors that say so; how
many images a message and a conversation may hold (live input and imports alike). It counts and checks; images
are decoded in one place, ``prompt.normalize_message``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..settings import GenerationSettings

if TYPE_CHECKING:  # types only: the pipeline module imports the whole package
    from ..pipeline import Pipeline

MAX_IMAGES_PER_MESSAGE = 8  # each image costs n_visual_tokens of context; more is almost surely a mistake
# A message is refused once the conversation holds this many images (any source), and one that would take it past:
# the images stay resident (and in the vision cache) as long as the conversation. An answer after the last
# accepted message may still add its own (at most MAX_IMAGES_PER_MESSAGE), so an export holds at most the sum.
MAX_IMAGES_PER_CONVERSATION = 64


def context_length(pipeline: Pipeline) -> int:
    """Positions the LM can attend over (``max_position_embeddings`` of its config)."""
    cfg = pipeline.model.lm.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(cfg, name, None)
        if isinstance(n, int) and n > 0:
            return n
    return 2048


def image_paths(pipeline: Pipeline, settings: GenerationSettings) -> tuple[bool, bool]:
    """(can retrieve, can generate) for this pipeline and mode."""
    can_ret = pipeline.index is not None and settings.mode in ("auto", "retrieve")
    can_gen = pipeline.config.can_generate and pipeline.diffusion is not None and settings.mode in ("auto", "generate")
    return can_ret, can_gen


def check_settings(pipeline: Pipeline, settings: GenerationSettings) -> None:
    """Refuse a mode the pipeline cannot serve, and more images per answer than a message may hold, with the fix."""
    name = pipeline.config.name
    if settings.max_images > MAX_IMAGES_PER_MESSAGE:  # an answer is a message: it is saved and imported as one
        raise ValueError(
            f"max_images={settings.max_images} is more than the limit of {MAX_IMAGES_PER_MESSAGE} images per "
            f"message (an answer is one); use max_images <= {MAX_IMAGES_PER_MESSAGE}"
        )
    if settings.mode == "retrieve" and pipeline.index is None:
        raise ValueError(
            f"mode='retrieve' needs an image index, and {name} has none loaded (pipeline.index is None): "
            f"load one (e.g. --index DIR) or use mode='auto' or 'text'"
        )
    if settings.mode == "generate":
        if not pipeline.config.can_generate:
            raise ValueError(
                f"mode='generate' needs an image generator, and {name} is a {pipeline.config.kind} "
                f"model (retrieval only): use mode='retrieve', 'auto' or 'text'"
            )
        if pipeline.diffusion is None:
            raise ValueError(
                f"mode='generate' needs Stable Diffusion, and {name} was loaded without it "
                f"(load_diffusion_pipeline=False): reload it with the pipeline"
            )


def image_positions(pipeline: Pipeline, settings: GenerationSettings) -> int:
    """Extra positions the forced [IMG1..r-1] tokens may take in one turn."""
    if settings.mode == "text" or not any(image_paths(pipeline, settings)):
        return 0
    return (pipeline.model.config.num_image_tokens - 1) * settings.max_images


def too_long(pipeline: Pipeline, settings: GenerationSettings, n_prompt: int, what: str) -> ValueError:
    n_ctx = context_length(pipeline)
    extra = image_positions(pipeline, settings)
    more = f" + {extra} for image tokens" if extra else ""
    return ValueError(
        f"{what} is {n_prompt} tokens, and with max_new_tokens={settings.max_new_tokens}{more} it needs "
        f"{n_prompt + settings.max_new_tokens + extra} positions, but the LM fits {n_ctx}: at most "
        f"{max(n_ctx - settings.max_new_tokens - extra, 0)} prompt tokens fit (each image takes "
        f"{pipeline.config.n_visual_tokens}). Shorten it or lower max_new_tokens."
    )


def check_image_counts(history_images: int, message_images: int, *, where: str = "the message") -> None:
    """Refuse a user message of ``message_images`` images in a conversation already holding ``history_images``
    (any message once the conversation is full: an answer could add images of its own)."""
    n, most = history_images, MAX_IMAGES_PER_CONVERSATION
    if message_images > MAX_IMAGES_PER_MESSAGE:
        raise ValueError(
            f"{where} holds {message_images} images, more than the limit of {MAX_IMAGES_PER_MESSAGE} per message; "
            f"send at most {MAX_IMAGES_PER_MESSAGE} images in one message"
        )
    if n >= most or n + message_images > most:
        now = f"holds {n} images" + (f" and {where} adds {message_images}" if message_images and n < most else "")
        raise ValueError(
            f"{where}: the conversation {now}, but one conversation keeps at most {most}; start a new "
            f"conversation (or undo turns with images)"
        )
