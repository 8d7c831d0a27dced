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
from dataclasses import dataclass, field
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


@dataclass(eq=False)
class _Job:
    """One call's generation, waiting to run in a batch with the calls made meanwhile."""

    prompt_embeds: torch.Tensor  # (n, L, D), padded to the text encoder's length, on the UNet's device and dtype
    negative: torch.Tensor | None  # (n, L, D), or None without guidance
    guidance_scale: float
    num_inference_steps: int
    generator: torch.Generator
    interrupt: Callable[[], bool] | None
    on_step: Callable[[int, int], None] | None
    stopped: bool = False
    outcome: GeneratedImages | BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def end(self, outcome: GeneratedImages | BaseException) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.done.set()

    def batch_key(self) -> tuple[object, ...]:
        """Calls batch together only when diffusers runs them alike (one guidance scale, one step count)."""
        pe = self.prompt_embeds
        return (self.guidance_scale, self.num_inference_steps, self.negative is None, pe.shape[1:], pe.dtype, pe.device)


class ImageGenerator:
    """Runs a diffusers ``StableDiffusionPipeline`` from ready-made ``prompt_embeds``.

    ``safety_checker``: run the pipeline's safety checker when it has one (a pipeline loaded without one cannot
    be checked; see ``DiffusionSpec.safety_checker``). Calls from several threads are batched: one thread of the
    generator's own runs the pipeline; while a batch runs, the calls that arrive wait, then run as one batch of up to
    ``max_batch`` images (those with the same guidance scale and step count), each from its own seeded noise, so a
    call's image does not depend on what it was batched with (up to float rounding). A call that is interrupted
    returns at that step while its batch mates go on. A ``Pipeline`` makes one for its diffusion pipeline
    (``Pipeline.image_generator``).
    """

    def __init__(
        self, sd_pipe: StableDiffusionPipeline, *, safety_checker: bool = True, max_batch: int = 8, idle_s: float = 30.0
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not idle_s > 0:
            raise ValueError(f"idle_s must be > 0, got {idle_s!r}")
        self.pipe = sd_pipe
        self.safety_checker = safety_checker
        self.max_batch = max_batch
        self._lock = pipeline_lock(sd_pipe)  # held while a batch runs: the pipeline's scheduler holds its state
        self._pending_lock = threading.Condition()
        self._pending: list[_Job] = []
        self._runner: threading.Thread | None = None
        # The runner ends after idle_s without work (the next call starts another): a running thread would keep the
        # generator, and the pipeline's gigabytes, alive after its owner let them go.
        self.idle_s = idle_s
        self._negative_lock = threading.Lock()
        self._negative: torch.Tensor | None = None
        self.batches: list[int] = []  # images per UNet batch, the last 64 (what batching achieved)

    @torch.no_grad()
    def negative_prompt_embeds(self) -> torch.Tensor:
        """``(1, L, D)`` text-encoder output of the empty prompt, computed once."""
        with self._negative_lock:
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
        job = self._submit(
            prompt_embeds,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            seed=seed,
            interrupt=interrupt,
            on_step=on_step,
        )
        while not job.done.wait(0.05):
            if interrupt is not None and interrupt():
                self._withdraw(job)  # still waiting: it never runs (running: it ends at its next step)
        if isinstance(job.outcome, BaseException):
            raise job.outcome
        assert job.outcome is not None, "a finished job has its outcome"
        return job.outcome

    def _submit(
        self,
        prompt_embeds: torch.Tensor,
        *,
        guidance_scale: float,
        num_inference_steps: int,
        seed: int,
        interrupt: Callable[[], bool] | None,
        on_step: Callable[[int, int], None] | None,
    ) -> _Job:
        """Check a call and queue it for the runner (started on first use)."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        unet_param = next(self.pipe.unet.parameters())
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
        job = _Job(pe, neg, guidance_scale, num_inference_steps, generator, interrupt, on_step)
        with self._pending_lock:
            self._pending.append(job)
            if self._runner is None:
                name = f"diffusion-batches-{id(self):x}"
                self._runner = threading.Thread(target=self._serve, name=name, daemon=True)
                self._runner.start()
            self._pending_lock.notify()
        return job

    def _withdraw(self, job: _Job) -> None:
        with self._pending_lock:
            if job in self._pending:
                self._pending.remove(job)
                job.end(GeneratedImages([], [], interrupted=True))

    @torch.no_grad()  # grad mode is per thread: the runner's must be off too
    def _serve(self) -> None:
        """The runner: the oldest waiting call's batch, then the next, until ``idle_s`` pass without a call."""
        while True:
            with self._pending_lock:
                if not self._pending_lock.wait_for(lambda: bool(self._pending), timeout=self.idle_s):
                    self._runner = None  # under the lock a caller checks before starting a runner
                    return
            with self._lock:  # the calls that arrive until it is free join this batch
                with self._pending_lock:
                    batch = self._take()
                if batch:
                    self._run(batch)

    def _take(self) -> list[_Job]:
        """The oldest waiting call and the later ones that batch with it, up to ``max_batch`` images (the caller
        holds ``_pending_lock``)."""
        for job in [job for job in self._pending if job.interrupt is not None and job.interrupt()]:
            job.end(GeneratedImages([], [], interrupted=True))  # interrupted while waiting: it never runs
        self._pending = [job for job in self._pending if job.outcome is None]
        if not self._pending:
            return []
        first = self._pending[0]
        batch, size = [], 0
        for job in self._pending:
            n = job.prompt_embeds.shape[0]
            if job.batch_key() == first.batch_key() and (not batch or size + n <= self.max_batch):
                batch.append(job)
                size += n
        self._pending = [job for job in self._pending if job not in batch]
        return batch

    def _run(self, batch: list[_Job]) -> None:
        """Run a batch; every job gets its outcome. A batch that fails (e.g. out of memory) is retried job by job,
        so one call's error is its own."""
        try:
            self._generate(batch)
        except Exception as e:
            if len(batch) == 1:
                batch[0].end(e)
                return
            logger.warning("a batch of %d generations failed (%s); running them one at a time", len(batch), e)
            for job in batch:
                try:
                    self._generate([job])
                except Exception as one:
                    job.end(one)
        finally:  # whatever happened, no caller is left waiting
            for job in batch:
                job.end(RuntimeError("the generation was abandoned before it finished"))

    def _generate(self, batch: list[_Job]) -> None:
        pipe, first = self.pipe, batch[0]
        steps = first.num_inference_steps
        pe = torch.cat([job.prompt_embeds for job in batch])
        neg = None if first.negative is None else torch.cat([job.negative for job in batch if job.negative is not None])
        # Each call's noise comes from its own generator, drawn as diffusers draws it for that call alone.
        latents = torch.cat([initial_noise(pipe, job.prompt_embeds.shape[0], job.generator, pe) for job in batch])
        # A scheduler that adds noise at each step (not DDIM with eta=0) draws it per image.
        generators = [job.generator for job in batch for _ in range(job.prompt_embeds.shape[0])]

        def on_step_end(
            p: StableDiffusionPipeline, step: int, timestep: object, tensors: dict[str, torch.Tensor]
        ) -> dict[str, torch.Tensor]:
            for job in batch:
                if job.stopped:
                    continue
                if job.on_step is not None:
                    job.on_step(step + 1, steps)
                if job.interrupt is not None and job.interrupt():
                    job.stopped = True  # its caller returns now; the batch goes on for the others
                    job.end(GeneratedImages([], [], interrupted=True))
            if all(job.stopped for job in batch):
                p._interrupt = True  # pyright: ignore[reportPrivateUsage]  # diffusers' documented way to end early
            return tensors

        self.batches = [*self.batches[-63:], pe.shape[0]]
        latents = pipe(
            prompt_embeds=pe,
            negative_prompt_embeds=neg,
            guidance_scale=first.guidance_scale,
            num_inference_steps=steps,
            generator=generators if len(batch) > 1 else first.generator,
            latents=latents,
            output_type="latent",
            # diffusers annotates the callback without the pipeline argument it passes first
            callback_on_step_end=on_step_end,  # pyright: ignore[reportArgumentType]
        ).images  # pyright: ignore[reportAttributeAccessIssue]  # return_dict=True (default): an output object
        running = [j for j, job in enumerate(batch) if not job.stopped]
        if not running:
            return
        sizes = [job.prompt_embeds.shape[0] for job in batch]
        starts = [sum(sizes[:j]) for j in range(len(batch))]
        rows = torch.tensor([starts[j] + i for j in running for i in range(sizes[j])])
        # Decoding here rather than inside the pipeline lets us skip the safety checker without reloading.
        image = pipe.vae.decode(
            latents[rows] / pipe.vae.config.scaling_factor, return_dict=False, generator=first.generator
        )[0]
        nsfw = [False] * len(rows)
        if self.safety_checker and pipe.safety_checker is not None:
            image, flags = pipe.run_safety_checker(image, pe.device, pe.dtype)
            nsfw = [bool(f) for f in flags] if flags is not None else nsfw
        images: list[Image.Image] = pipe.image_processor.postprocess(  # pyright: ignore[reportAssignmentType]
            image, output_type="pil", do_denormalize=[not f for f in nsfw]
        )  # output_type="pil": a list of PIL images
        if any(nsfw):
            logger.info("the safety checker blanked %d of %d generated image(s)", sum(nsfw), len(nsfw))
        at = 0
        for j in running:
            batch[j].end(GeneratedImages(images[at : at + sizes[j]], nsfw[at : at + sizes[j]]))
            at += sizes[j]

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
        1) while it runs, then the ``GeneratedImages``. The call waits in a helper thread, which hands the steps
        over as diffusers reports them; closing the iterator early interrupts the call and waits for it to end (at
        once if it was still waiting; running, at its next step, while its batch mates go on)."""
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
            abandoned.set()  # the call ends at its next step (or at once if still waiting); its batch mates go on
            worker.join()


_PIPE_LOCKS: dict[int, threading.Lock] = {}
_PIPE_LOCKS_GUARD = threading.Lock()


def pipeline_lock(pipe: object) -> threading.Lock:
    """One lock per diffusers pipeline object, whichever ``ImageGenerator`` drives it: a pipeline call keeps its
    scheduler's timesteps and its interrupt flag on the pipeline, so two calls must never overlap."""
    with _PIPE_LOCKS_GUARD:
        return _PIPE_LOCKS.setdefault(id(pipe), threading.Lock())


def initial_noise(
    pipe: StableDiffusionPipeline, n: int, generator: torch.Generator, like: torch.Tensor
) -> torch.Tensor:
    """The starting latents diffusers draws for ``n`` images at the UNet's default size from ``generator`` (before
    the scheduler's ``init_noise_sigma``, which the pipeline applies to given latents too)."""
    from diffusers.utils.torch_utils import randn_tensor

    size = pipe.unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    scale = pipe.vae_scale_factor  # diffusers' default height is sample_size * scale, then // scale for latents
    shape = (n, pipe.unet.config.in_channels, int(h * scale) // scale, int(w * scale) // scale)
    return randn_tensor(shape, generator=generator, device=like.device, dtype=like.dtype)


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
