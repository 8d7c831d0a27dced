"""Stable Diffusion conditioned on GILLMapper output: ``prompt_embeds`` in, images out.

What differs from the published GILL code: the negative (unconditional) embeddings of the empty prompt are
computed once per diffusion pipeline and passed explicitly, so classifier-free guidance contrasts the request with
the same baseline the text-to-image model was trained with; the caller decides whether to run it at all (the
generation loop only calls it on the "generate" path); the generator is seeded per image; the safety checker can
be switched off per generator; a running generation can be interrupted between denoising steps; and
``ImageGenerator.steps`` yields each finished step while the image is made (the progress a chat shows).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from PIL import Image

from ..config import ModelConfig

if TYPE_CHECKING:  # types only: importing diffusers is slow
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

logger = logging.getLogger(__name__)


@dataclass
class GeneratedImages:
    images: list[Image.Image]
    nsfw: list[bool]  # True where the safety checker blanked the image
    interrupted: bool = False


class ImageGenerator:
    """Runs a diffusers ``StableDiffusionPipeline`` from ready-made ``prompt_embeds``.

    ``safety_checker``: run the pipeline's safety checker when it has one (a pipeline loaded without one cannot
    be checked; see ``DiffusionSpec.safety_checker``). Calls are serialised: one pipeline, one generation at a time.
    A ``Pipeline`` makes one for its diffusion pipeline (``Pipeline.image_generator``).
    """

    def __init__(self, sd_pipe: StableDiffusionPipeline, *, safety_checker: bool = True):
        self.pipe = sd_pipe
        self.safety_checker = safety_checker
        self._lock = threading.Lock()  # one generation at a time: the pipeline's scheduler holds its state
        self._negative: torch.Tensor | None = None

    @torch.no_grad()
    def negative_prompt_embeds(self) -> torch.Tensor:
        """``(1, L, D)`` text-encoder output of the empty prompt, computed once."""
        with self._lock:
            if self._negative is None:
                self._negative, _ = self.pipe.encode_prompt("", self.pipe.text_encoder.device, 1, False)
            return self._negative

    @torch.no_grad()
    def __call__(
        self,
        prompt_embeds: torch.Tensor,
        *,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 50,
        seed: int = 0,
        interrupt: Callable[[], bool] | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> GeneratedImages:
        """``prompt_embeds``: ``(N, Q, D)``. ``interrupt``: a callable checked after every denoising step; when it
        returns True the generation stops and ``interrupted`` is set (no images). ``on_step(step, steps)``: called
        after each denoising step (step counts from 1)."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        pipe = self.pipe
        unet_param = next(pipe.unet.parameters())
        pe = prompt_embeds.to(device=unet_param.device, dtype=unet_param.dtype)
        n = pe.shape[0]
        neg = None
        if guidance_scale > 1:  # diffusers only runs the unconditional branch above 1
            neg = self.negative_prompt_embeds().to(device=pe.device, dtype=pe.dtype)
            if pe.shape[1] < neg.shape[1]:
                # The published code pads a shorter conditioning with zeros to the text encoder's length.
                pe = torch.cat([pe, pe.new_zeros(n, neg.shape[1] - pe.shape[1], pe.shape[2])], dim=1)
            elif pe.shape[1] > neg.shape[1]:
                raise ValueError(f"prompt_embeds has {pe.shape[1]} tokens, more than the text encoder's {neg.shape[1]}")
            neg = neg.expand(n, -1, -1)
        generator = torch.Generator("cpu").manual_seed(int(seed))
        stopped = False

        def on_step_end(
            p: StableDiffusionPipeline, step: int, timestep: object, tensors: dict[str, torch.Tensor]
        ) -> dict[str, torch.Tensor]:
            nonlocal stopped
            if on_step is not None:
                on_step(step + 1, num_inference_steps)
            if interrupt is not None and interrupt():
                stopped = True
                p._interrupt = True  # pyright: ignore[reportPrivateUsage]  # diffusers' documented way to end early
            return tensors

        with self._lock:
            latents = pipe(
                prompt_embeds=pe,
                negative_prompt_embeds=neg,
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                generator=generator,
                output_type="latent",
                # diffusers annotates the callback without the pipeline argument it passes first
                callback_on_step_end=on_step_end,  # pyright: ignore[reportArgumentType]
            ).images  # pyright: ignore[reportAttributeAccessIssue]  # return_dict=True (default): an output object
            if stopped:
                return GeneratedImages([], [], interrupted=True)
            # Decoding here rather than inside the pipeline lets us skip the safety checker without reloading.
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
            nsfw = [False] * n
            if self.safety_checker and pipe.safety_checker is not None:
                image, flags = pipe.run_safety_checker(image, pe.device, pe.dtype)
                nsfw = [bool(f) for f in flags] if flags is not None else nsfw
            images: list[Image.Image] = pipe.image_processor.postprocess(  # pyright: ignore[reportAssignmentType]
                image, output_type="pil", do_denormalize=[not f for f in nsfw]
            )  # output_type="pil": a list of PIL images
        if any(nsfw):
            logger.info("the safety checker blanked %d of %d generated image(s)", sum(nsfw), n)
        return GeneratedImages(images, nsfw)

    def steps(
        self,
        prompt_embeds: torch.Tensor,
        *,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 50,
        seed: int = 0,
        interrupt: Callable[[], bool] | None = None,
    ) -> Iterator[int | GeneratedImages]:
        """The same generation as calling this generator, yielding the number of each finished denoising step (from
        1) while it runs, then the ``GeneratedImages``. diffusers reports a step through a callback, in the middle
        of its loop, so the generation runs in a helper thread and hands the steps over; closing the iterator
        early interrupts the generation and waits for it to end."""
        handed: queue.SimpleQueue[int | GeneratedImages | BaseException] = queue.SimpleQueue()
        abandoned = threading.Event()  # the consumer went away: nobody wants the image any more

        def stop() -> bool:
            return abandoned.is_set() or (interrupt is not None and interrupt())

        def work() -> None:
            try:
                handed.put(
                    self(
                        prompt_embeds,
                        guidance_scale=guidance_scale,
                        num_inference_steps=num_inference_steps,
                        seed=seed,
                        interrupt=stop,
                        on_step=lambda step, _: handed.put(step),
                    )
                )
            except BaseException as e:  # raised in the consumer's thread
                handed.put(e)

        worker = threading.Thread(target=work, name="diffusion", daemon=True)
        worker.start()
        try:
            while True:
                item = handed.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GeneratedImages):
                    return
        finally:
            abandoned.set()
            worker.join()


class WithImageGenerator(Protocol):
    """What ``image_generator`` reads of a ``Pipeline`` (which imports this module: named here, not imported)."""

    config: ModelConfig
    image_generator: ImageGenerator | None


def image_generator(pipeline: WithImageGenerator) -> ImageGenerator:
    """The ``ImageGenerator`` of a ``Pipeline``, or a ``ValueError`` saying why it has none."""
    if pipeline.image_generator is None:
        if not pipeline.config.can_generate:
            raise ValueError(
                f"{pipeline.config.name} is a {pipeline.config.kind} model: it retrieves images but "
                f"cannot generate them"
            )
        raise ValueError(
            f"{pipeline.config.name} was loaded without its Stable Diffusion pipeline "
            f"(load_diffusion_pipeline=False): reload it with the pipeline to generate images"
        )
    return pipeline.image_generator
