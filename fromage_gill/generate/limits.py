"""What a pipeline can serve: its context length, which image paths a mode has, and the errors that say so."""

from __future__ import annotations

from ..settings import GenerationSettings


def context_length(pipeline) -> int:
    """Positions the LM can attend over (``max_position_embeddings`` of its config)."""
    cfg = pipeline.model.lm.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(cfg, name, None)
        if isinstance(n, int) and n > 0:
            return n
    return 2048


def image_paths(pipeline, settings: GenerationSettings) -> tuple[bool, bool]:
    """(can retrieve, can generate) for this pipeline and mode."""
    can_ret = pipeline.index is not None and settings.mode in ("auto", "retrieve")
    can_gen = pipeline.config.can_generate and pipeline.diffusion is not None and settings.mode in ("auto", "generate")
    return can_ret, can_gen


def check_settings(pipeline, settings: GenerationSettings) -> None:
    """Refuse a mode the pipeline cannot serve, with the fix."""
    name = pipeline.config.name
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


def image_positions(pipeline, settings: GenerationSettings) -> int:
    """Extra positions the forced [IMG1..r-1] tokens may take in one turn."""
    if settings.mode == "text" or not any(image_paths(pipeline, settings)):
        return 0
    return (pipeline.model.config.num_image_tokens - 1) * settings.max_images


def too_long(pipeline, settings: GenerationSettings, n_prompt: int, what: str) -> ValueError:
    n_ctx = context_length(pipeline)
    extra = image_positions(pipeline, settings)
    more = f" + {extra} for image tokens" if extra else ""
    return ValueError(
        f"{what} is {n_prompt} tokens, and with max_new_tokens={settings.max_new_tokens}{more} it needs "
        f"{n_prompt + settings.max_new_tokens + extra} positions, but the LM fits {n_ctx}: at most "
        f"{max(n_ctx - settings.max_new_tokens - extra, 0)} prompt tokens fit (each image takes "
        f"{pipeline.config.n_visual_tokens}). Shorten it or lower max_new_tokens."
    )
