"""Pretraining the toy world's frozen backbones, one function per backbone, each saved in its library's standard
format so that ``fromage_gill.backbones`` loads it as a local directory:

- ``train_tokenizers``: a byte-level BPE on the world's text -> ``lm/`` (OPT-style: BOS prepended) and
  ``clip/`` (EOS appended, where CLIP's text tower pools) as ``PreTrainedTokenizerFast`` directories;
- ``pretrain_clip``: a transformers ``CLIPModel`` (vision + text towers, symmetric contrastive loss) -> ``clip/``;
- ``pretrain_lm``: a transformers OPT causal LM on captions and dialogues -> ``lm/``;
- ``pretrain_vae`` and ``pretrain_unet``: a diffusers ``AutoencoderKL`` and a ``UNet2DConditionModel``
  conditioned on the CLIP's (frozen) text tower -> ``diffusion/`` as a ``StableDiffusionPipeline``.

Each returns a ``StageReport`` with the quality it reached on held-out world data. Everything is
seeded; on the same machine and torch version a rebuild gives the same weights.
"""

# The toy trains diffusers and transformers models directly, and those libraries type every model output as
# `SomeOutput | tuple` (the return_dict switch) and configs as dicts: each `.latent_dist`, `.sample`,
# `.pooler_output` or `config.scaling_factor` below would need a cast. Checked in pyright's standard mode otherwise.
# pyright: reportAttributeAccessIssue=false, reportArgumentType=false

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..backbones import sd_scheduler
from ..images import CLIP_MEAN, CLIP_STD
from ..typed_json import JSONValue
from . import world as W

if TYPE_CHECKING:
    from transformers import CLIPModel, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 (as in the tiny presets)


@dataclass(frozen=True)
class Recipe:
    """Sizes and step counts of every backbone. ``Recipe()`` is the shipped build; ``Recipe.smoke()`` runs each
    stage for a few steps (for tests of the build machinery, not of quality)."""

    seed: int = 0
    n_images: int = 20_000  # training image pool (pixel variants are fresh per scene)
    vocab_size: int = 512
    text_length: int = 24  # CLIP / diffusion text positions = GILL's mapper.num_queries
    clip_width: int = 128
    clip_layers: int = 3
    clip_patch: int = 16
    clip_steps: int = 2000
    clip_batch: int = 96
    clip_lr: float = 1e-3
    lm_width: int = 128
    lm_layers: int = 2
    lm_steps: int = 3000
    lm_batch: int = 64  # documents per step (each from position 0, as a chat prompt)
    lm_described_captions: float = 0.5  # share of the LM's captions written after their image's description
    lm_max_turns: int = 3  # exchanges per pretraining conversation (1 to this many)
    lm_lr: float = 1e-3
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_crop: int = 32  # trained on random crops: convolutions do not care, and a crop costs a quarter
    vae_lr: float = 1e-3
    unet_channels: tuple[int, ...] = (32, 64)
    unet_steps: int = 5000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    # Min-SNR-gamma loss weighting (Hang et al. 2023; 0 = plain epsilon MSE): the many easy low-noise timesteps
    # stop dominating the gradient, so the same steps learn the prompt's colour and shape sooner
    unet_min_snr: float = 5.0  # 0 -> 5: held-out dominant colour 0.60 -> 0.97, CLIP shape 0.30 -> 0.55
    eval_images: int = 300
    eval_prompts: int = 60  # LM in-context questions and diffusion prompts
    eval_sampling_steps: int = 25
    # The method stage (toy-fromage / toy-gill layers on the frozen backbones, `fromage-gill train` defaults else)
    method_steps: int = 3000
    method_batch: int = 32
    method_lr: float = 1e-3
    method_warmup: int = 100
    # Share of the method's training images whose [RET]/[IMG] tokens follow the caption worded as the chat's answer
    # ("here is a photo of ...", the data's query column): in a chat they follow such an answer, never a bare
    # caption (the captioning loss keeps the caption)
    answer_caption_share: float = 0.5
    # Share captioned as the answer to a chat question about the image (the data's prompt column, read before the
    # caption): the visual tokens then also learn in the layout a chat shows them in, not only before a caption
    prompt_caption_share: float = 0.5
    # toy-gill's captioning loss also predicts the chat's end of turn after each caption (`fromage-gill train
    # --caption-end`), so a description of a shown image ends in words instead of with an unasked image (described
    # without an image 0.00 -> 0.97). toy-fromage trains without it: with its one visual token the captioning
    # collapsed (colour and shape both right 0.35 -> 0.08)
    gill_caption_end: str = "\n"
    # Share of the decision head's prompts that follow an earlier "show" / "draw" exchange: later in a chat the head
    # reads the state after both, and trained on single exchanges it sent "show me" after a drawing to generation
    decision_earlier_share: float = 0.5
    decision_steps: int = 1000
    decision_lr: float = 1e-2
    gallery_images: int = 300

    def __post_init__(self) -> None:
        for name in ("n_images", "vocab_size", "text_length", "clip_steps", "lm_steps", "vae_steps", "unet_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"Recipe.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def smoke(cls) -> Recipe:
        return cls(
            n_images=256,
            clip_steps=3,
            clip_batch=16,
            lm_steps=3,
            lm_batch=4,
            vae_steps=3,
            vae_batch=4,
            unet_steps=3,
            unet_batch=4,
            eval_images=24,
            clip_width=32,
            clip_layers=1,
            lm_width=32,
            lm_layers=1,
            vae_channels=(8, 8, 8),
            unet_channels=(16, 16),
            clip_patch=16,
            vae_crop=16,
            eval_prompts=4,
            eval_sampling_steps=2,
            method_steps=4,
            method_batch=4,
            method_warmup=1,
            decision_steps=4,
            gallery_images=8,
        )


@dataclass
class StageReport:
    stage: str
    metrics: dict[str, JSONValue] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ data


def corpus(
    n: int,
    *,
    split: W.Split,
    seed: int,
    bos: str,
    caption_share: float = 0.2,
    described_captions: float = 0.5,
    max_turns: int = 3,
) -> list[str]:
    """The LM's pretraining text: captions, and dialogues in which a shown image appears as its description in
    parentheses (a text-only LM cannot see; this teaches it to answer from what the context says about an
    image, which the trained visual tokens later supply instead). Everything is laid out as the chat engine lays
    it out, BOS (``bos``) included: the images of a first turn come before BOS and ``Q:``
    (``(a red circle) <bos>Q: ...``), as the trained visual tokens will. A share ``described_captions`` of the
    captions is written the same way after their image's description (``(description) <bos>caption``): the
    captioning layout the method trains the visual tokens in (``[image] <bos> caption``)."""
    rng = np.random.default_rng([seed, 10 if split == "train" else 11])
    # Mostly dialogues: answering from the context is the skill the method needs, and plain captions (whose
    # attributes are random, hence most of the loss) would drown its signal.
    out = []
    for i, s in enumerate(W.scenes(int(n * caption_share), split=split, seed=seed + 3)):
        # every other caption for 0.5 (the shipped LM), none for 0, all for 1
        lead = f"({W.describe(s)}) " if (i * described_captions) % 1 >= 1 - described_captions else ""
        out += [f"{lead}{bos}{c}" for c in W.captions(s, rng)]
    # Conversations of 1 to max_turns exchanges: in a chat, a question follows earlier ones (and their images),
    # and the answer must be about the new question.
    turns = np.random.default_rng([seed, 12 if split == "train" else 13])
    dialogues = W.dialogues(n - len(out), split=split, seed=seed + 4)
    i = 0
    while i < len(dialogues):
        k = int(turns.integers(1, max_turns + 1))
        group = dialogues[i : i + k]
        out.append(W.Dialogue(group[0].kind, tuple(t for d in group for t in d.turns)).text(image=described, bos=bos))
        i += k
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def tokenizer_text(n: int, *, split: W.Split, seed: int, caption_share: float = 0.2) -> list[str]:
    """The text the BPE is trained on: the world's captions and dialogues, each image written inside its question
    (``Q: (description) ...``). Only the words matter to a BPE; this layout is the one the shipped tokenizer (and
    so the CLIP and UNet trained with it) was built from, kept so a rebuild reproduces them."""
    rng = np.random.default_rng([seed, 10 if split == "train" else 11])
    out = [c for s in W.scenes(int(n * caption_share), split=split, seed=seed + 3) for c in W.captions(s, rng)]
    for d in W.dialogues(n - len(out), split=split, seed=seed + 4):
        lines = []
        for turn in d.turns:
            if turn.role == "user":
                lines.append("Q: " + "".join(f"({W.describe(s)}) " for s in turn.images) + turn.text)
            else:
                lines.append(f"\nA: {turn.text}")
        out.append("\n".join(lines).replace("\n\nA:", "\nA:"))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def described(scene: W.Scene) -> str:
    """A shown image as the text-only LM reads it in pretraining."""
    return f"({W.describe(scene)})"


def image_pool(n: int, *, split: W.Split, seed: int, progress: bool = True) -> tuple[list[W.Scene], torch.Tensor]:
    """``n`` scenes and their pixels as uint8 (N, 3, 64, 64)."""
    items = W.scenes(n, split=split, seed=seed)
    pixels = np.stack(
        [np.asarray(s.render()) for s in tqdm(items, desc=f"render {split} images", disable=not progress, leave=False)]
    )
    return items, torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def clip_pixels(uint8: torch.Tensor) -> torch.Tensor:
    """CLIP normalisation, exactly what ``fromage_gill.images.ImageProcessor`` does to a 64x64 image."""
    x = uint8.float() / 255.0
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def vae_pixels(uint8: torch.Tensor) -> torch.Tensor:
    return uint8.float() / 127.5 - 1.0


def _schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _loop(
    name: str, steps: int, params, lr: float, step_fn: Callable[[int], torch.Tensor], weight_decay: float = 0.01
) -> list[float]:
    """AdamW + warm-up/cosine, grad-clip 1.0, a tqdm bar with the running loss. Returns the loss curve."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    sched = _schedule(opt, steps, warmup=max(1, steps // 20))
    losses: list[float] = []
    bar = tqdm(range(steps), desc=name, dynamic_ncols=True)
    for step in bar:
        loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return losses


# ------------------------------------------------------------------------------------------------ tokenizers


def train_tokenizers(out: Path, recipe: Recipe) -> StageReport:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    lines = tokenizer_text(4000, split="train", seed=recipe.seed, caption_share=0.5)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer)
    eos = tok.token_to_id("</s>")
    common = dict(bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    # LM: OPT's convention, "</s>" as BOS before every text.
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", eos)]
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=2048, **common).save_pretrained(out / "lm")
    # CLIP text tower: EOS after the text (it pools there), padded to a fixed length for the diffusion UNet.
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", eos)]
    )
    clip_tok = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=recipe.text_length, **common)
    clip_tok.save_pretrained(out / "clip")
    lengths = [len(clip_tok(t).input_ids) for t in tokenizer_text(400, split="test", seed=recipe.seed) if "\n" not in t]
    words = sum(len(t.split()) for t in lines)
    tokens = sum(len(tok.encode(t).ids) for t in lines)
    return StageReport(
        "tokenizer",
        {
            "vocab_size": tok.get_vocab_size(),
            "tokens_per_word": round(tokens / words, 3),
            "max_caption_tokens": max(lengths),
            "text_length": recipe.text_length,
        },
    )


def load_clip_tokenizer(out: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out / "clip")


# ------------------------------------------------------------------------------------------------ CLIP


def clip_config(recipe: Recipe, vocab_size: int):
    from transformers import CLIPConfig

    w, n = recipe.clip_width, recipe.clip_layers
    return CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=w,
            intermediate_size=4 * w,
            num_hidden_layers=n,
            num_attention_heads=4,
            max_position_embeddings=recipe.text_length,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=1,
            projection_dim=w,
        ),
        vision_config=dict(
            hidden_size=w,
            intermediate_size=4 * w,
            num_hidden_layers=n,
            num_attention_heads=4,
            image_size=W.IMAGE_SIZE,
            patch_size=recipe.clip_patch,
            projection_dim=w,
        ),
        projection_dim=w,
    )


def pretrain_clip(out: Path, recipe: Recipe) -> StageReport:
    """Contrastive pretraining on (image, varied caption). Captions that are the same string are both
    positives (many images share "a red circle"): the target is spread evenly over them."""
    from transformers import CLIPModel

    tok = load_clip_tokenizer(out)
    torch.manual_seed(recipe.seed)
    model = CLIPModel(clip_config(recipe, len(tok)))
    scenes, pixels = image_pool(recipe.n_images, split="train", seed=recipe.seed + 20)
    rng = np.random.default_rng([recipe.seed, 21])
    model.train()

    def step(_: int) -> torch.Tensor:
        idx = rng.choice(len(scenes), recipe.clip_batch, replace=False)
        texts = [W.captions(scenes[i], rng)[0] for i in idx]
        ids = tok(texts, padding="max_length", truncation=True, return_tensors="pt").input_ids
        img = F.normalize(model.get_image_features(pixel_values=clip_pixels(pixels[idx])).pooler_output, dim=-1)
        txt = F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * txt @ img.T  # (B text, B images)
        # A caption is a positive for every image of the batch it describes equally well (same text).
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

    losses = _loop("pretrain clip", recipe.clip_steps, model.parameters(), recipe.clip_lr, step)
    model.eval()
    model.save_pretrained(out / "clip")
    metrics = evaluate_clip(model, tok, recipe)
    metrics["final_loss"] = round(float(np.mean(losses[-50:])), 4)
    return StageReport("clip", metrics)


@torch.no_grad()
def clip_embed_images(model: CLIPModel, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    out = [
        model.get_image_features(pixel_values=clip_pixels(pixels[i : i + batch])).pooler_output
        for i in range(0, len(pixels), batch)
    ]
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def clip_embed_texts(
    model: CLIPModel, tok: PreTrainedTokenizerBase, texts: list[str], batch: int = 256
) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch):
        ids = tok(texts[i : i + batch], padding="max_length", truncation=True, return_tensors="pt").input_ids
        out.append(model.get_text_features(input_ids=ids).pooler_output)
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def evaluate_clip(model: CLIPModel, tok: PreTrainedTokenizerBase, recipe: Recipe) -> dict[str, JSONValue]:
    """On held-out scenes: caption -> image retrieval (a hit is any image whose attributes match the caption's,
    R@1/5/10 with chance), and zero-shot colour / shape classification of one-shape images."""
    scenes, pixels = image_pool(recipe.eval_images, split="test", seed=recipe.seed + 99, progress=False)
    img = clip_embed_images(model, pixels)
    txt = clip_embed_texts(model, tok, [s.caption for s in scenes])
    ranks = (txt @ img.T).argsort(dim=1, descending=True)
    keys = [s.key for s in scenes]
    metrics: dict[str, JSONValue] = {}
    for k in (1, 5, 10):
        hits = [any(keys[j] == keys[i] for j in ranks[i, :k].tolist()) for i in range(len(scenes))]
        metrics[f"retrieval_R@{k}"] = round(float(np.mean(hits)), 3)
    metrics["retrieval_chance_R@1"] = round(float(np.mean([keys.count(k) / len(keys) for k in keys])), 4)
    singles = [i for i, s in enumerate(scenes) if len(s.things) == 1]
    labels = [(c, s) for c in W.COLOURS for s in W.SHAPES]
    cls = clip_embed_texts(model, tok, [f"a {c} {s}" for c, s in labels])
    pred = (img[singles] @ cls.T).argmax(1).tolist()
    metrics["zero_shot_colour_acc"] = round(
        float(np.mean([labels[p][0] == scenes[i].things[0].colour for p, i in zip(pred, singles, strict=True)])), 3
    )
    metrics["zero_shot_shape_acc"] = round(
        float(np.mean([labels[p][1] == scenes[i].things[0].shape for p, i in zip(pred, singles, strict=True)])), 3
    )
    metrics["eval_images"] = len(scenes)
    return metrics


# ------------------------------------------------------------------------------------------------ LM


def pretrain_lm(out: Path, recipe: Recipe) -> StageReport:
    """An OPT-style causal LM on world text (captions and dialogues), next-token cross-entropy. Each example is one
    document starting at position 0, as a chat prompt does (not windows of a packed stream): a description written
    before BOS must be read across it, as the chat engine's images before BOS are."""
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    tok = AutoTokenizer.from_pretrained(out / "lm")
    w = recipe.lm_width
    config = OPTConfig(
        vocab_size=len(tok),
        hidden_size=w,
        word_embed_proj_dim=w,
        num_hidden_layers=recipe.lm_layers,
        ffn_dim=4 * w,
        num_attention_heads=4,
        max_position_embeddings=512,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,  # pyright: ignore[reportCallIssue] -- an OPT config field, taken through **kwargs
        layerdrop=0.0,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(recipe.seed)
    model = OPTForCausalLM(config)
    texts = corpus(
        recipe.n_images * 2,
        split="train",
        seed=recipe.seed,
        bos=tok.bos_token,
        described_captions=recipe.lm_described_captions,
        max_turns=recipe.lm_max_turns,
    )
    docs = [_doc_ids(tok, t) for t in texts]
    rng = np.random.default_rng([recipe.seed, 30])
    model.train()

    def step(_: int) -> torch.Tensor:
        ids, mask, labels = _batch(tok, [docs[i] for i in rng.integers(0, len(docs), recipe.lm_batch)])
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    losses = _loop("pretrain lm", recipe.lm_steps, model.parameters(), recipe.lm_lr, step)
    model.eval()
    model.save_pretrained(out / "lm")
    metrics = evaluate_lm(model, tok, recipe)
    metrics["final_loss"] = round(float(np.mean(losses[-50:])), 4)
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    return StageReport("lm", metrics)


def _doc_ids(tok, text: str, *, end: bool = True) -> list[int]:
    """A document's ids: its text carries BOS where the chat engine puts it (first, or after a first turn's
    images); ``end`` adds EOS, so the LM learns where an answer stops."""
    ids = tok(text, add_special_tokens=False).input_ids or [tok.bos_token_id]
    return [*ids, tok.eos_token_id] if end else ids


def _batch(tok, docs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids, attention_mask, labels)``; padding is masked out of the loss."""
    n = max(len(d) for d in docs)
    ids = torch.full((len(docs), n), tok.pad_token_id)
    mask = torch.zeros((len(docs), n), dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = torch.tensor(d)
        mask[i, : len(d)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


@torch.no_grad()
def evaluate_lm(model: PreTrainedModel, tok: PreTrainedTokenizerBase, recipe: Recipe) -> dict[str, JSONValue]:
    """Held-out perplexity, and in-context answers: given an image's description in the context (as in the
    corpus), does greedy decoding name its colour and shape?"""
    docs = [_doc_ids(tok, t) for t in corpus(400, split="test", seed=recipe.seed, bos=tok.bos_token)]
    nll, count = 0.0, 0
    for i in range(0, len(docs), 64):
        ids, mask, labels = _batch(tok, docs[i : i + 64])
        n = int((labels[:, 1:] != -100).sum())
        nll += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * n
        count += n
    rng = np.random.default_rng([recipe.seed, 31])
    singles = W.scenes(recipe.eval_prompts, split="test", seed=recipe.seed + 32, two=False)
    colour_ok = shape_ok = 0
    samples = []
    for i, s in enumerate(singles):
        q = "What colour is the shape?" if i % 2 == 0 else "What shape is this?"
        prompt = f"{described(s)}{tok.bos_token}Q: {q}\nA:"  # the chat engine's layout, as in the corpus
        answer = generate_text(model, tok, prompt, max_new_tokens=12)
        if i % 2 == 0:
            colour_ok += s.things[0].colour in answer.split(".")[0]
        else:
            shape_ok += s.things[0].shape in answer.split(".")[0]
        if i < 4:
            samples.append(prompt + answer)
    free = [generate_text(model, tok, "", max_new_tokens=30, sample=True, rng=rng) for _ in range(4)]
    return {
        "test_perplexity": round(math.exp(nll / count), 3),
        "in_context_colour_acc": round(colour_ok / math.ceil(len(singles) / 2), 3),
        "in_context_shape_acc": round(shape_ok / (len(singles) // 2), 3),
        "in_context_questions": len(singles),
        "samples": samples,
        "free_samples": free,
    }


@torch.no_grad()
def generate_text(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompt: str,
    *,
    max_new_tokens: int,
    sample: bool = False,
    rng: np.random.Generator | None = None,
) -> str:
    ids = torch.tensor([_doc_ids(tok, prompt, end=False)])
    out = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids).logits[0, -1]
        if sample:
            assert rng is not None, "sampling draws from rng"
            probs = torch.softmax(logits.double(), -1).numpy()
            nxt = int(rng.choice(len(probs), p=probs / probs.sum()))
        else:
            nxt = int(logits.argmax())
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        if "\n" in tok.decode(out[-1:]):
            break
    return str(tok.decode(out))  # one sequence in, one str out


# ------------------------------------------------------------------------------------------------ diffusion


def vae_config(recipe: Recipe) -> dict[str, JSONValue]:
    n = len(recipe.vae_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=list(recipe.vae_channels),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=W.IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def pretrain_vae(out: Path, recipe: Recipe) -> StageReport:
    """AutoencoderKL (64x64 -> 4 x 16 x 16) with an L1 + MSE reconstruction loss and a small KL term; then
    sets ``scaling_factor`` so that scaled latents have unit variance, as Stable Diffusion's VAE does."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    torch.manual_seed(recipe.seed)
    vae = AutoencoderKL(**vae_config(recipe))
    _, pixels = image_pool(recipe.n_images, split="train", seed=recipe.seed + 40)
    rng = np.random.default_rng([recipe.seed, 41])
    vae.train()

    def step(_: int) -> torch.Tensor:
        x = vae_pixels(pixels[rng.choice(len(pixels), recipe.vae_batch, replace=False)])
        top, left = rng.integers(0, W.IMAGE_SIZE - recipe.vae_crop + 1, 2)
        x = x[:, :, top : top + recipe.vae_crop, left : left + recipe.vae_crop]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / x[0].numel()
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-4 * kl

    losses = _loop("pretrain vae", recipe.vae_steps, vae.parameters(), recipe.vae_lr, step, weight_decay=0.0)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(vae_pixels(pixels[i : i + 256])).latent_dist.mean for i in range(0, 2048, 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    (out / "diffusion").mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out / "diffusion" / "vae")
    scenes, test = image_pool(recipe.eval_images, split="test", seed=recipe.seed + 99, progress=False)
    with torch.no_grad():
        recon = vae.decode(vae.encode(vae_pixels(test)).latent_dist.mean).sample
    images = _to_pil(recon)
    colour_ok = [
        W.dominant_colour(im) == s.things[0].colour for im, s in zip(images, scenes, strict=True) if len(s.things) == 1
    ]
    _grid([_to_pil(vae_pixels(test[:16]))[i] for i in range(16)] + images[:16], 16).save(out / "vae_recon.png")
    return StageReport(
        "vae",
        {
            "test_mse": round(float(F.mse_loss(recon, vae_pixels(test))), 5),
            "scaling_factor": round(1 / float(latents.std()), 4),
            "recon_dominant_colour_acc": round(float(np.mean(colour_ok)), 3),
            "final_loss": round(float(np.mean(losses[-50:])), 4),
        },
    )


def unet_config(recipe: Recipe, cross_attention_dim: int) -> dict[str, JSONValue]:
    n = len(recipe.unet_channels)
    return dict(
        sample_size=W.IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=list(recipe.unet_channels),
        # Cross-attention only below full latent resolution: attention over 16x16 positions would
        # dominate the CPU cost, and colour and shape need no finer conditioning than 8x8.
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1),
        up_block_types=["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"],
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def pretrain_unet(out: Path, recipe: Recipe) -> StageReport:
    """A text-conditioned UNet2DConditionModel on the VAE's latents (epsilon prediction, DDPM schedule of
    Stable Diffusion), conditioned on the frozen CLIP text tower's last hidden states. 10% of captions are
    dropped to "" so that classifier-free guidance works. Saves the whole StableDiffusionPipeline."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    from transformers import CLIPTextModel

    tok = load_clip_tokenizer(out)
    text_encoder = CLIPTextModel.from_pretrained(out / "clip").eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(out / "diffusion" / "vae").eval().requires_grad_(False)
    torch.manual_seed(recipe.seed)
    unet = UNet2DConditionModel(**unet_config(recipe, text_encoder.config.hidden_size))
    noise_sched = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    scenes, pixels = image_pool(recipe.n_images, split="train", seed=recipe.seed + 50)
    with torch.no_grad():  # the VAE is frozen: encode the pool once
        moments = torch.cat(
            [
                vae.encode(vae_pixels(pixels[i : i + 256])).latent_dist.parameters
                for i in tqdm(range(0, len(pixels), 256), desc="encode latents", leave=False)
            ]
        )
    rng = np.random.default_rng([recipe.seed, 51])
    gen = torch.Generator().manual_seed(recipe.seed)
    alphas = noise_sched.alphas_cumprod
    unet.train()

    def step(_: int) -> torch.Tensor:
        idx = rng.choice(len(scenes), recipe.unet_batch, replace=False)
        texts = [W.captions(scenes[i], rng)[0] if rng.random() > 0.1 else "" for i in idx]
        ids = tok(texts, padding="max_length", truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            cond = text_encoder(ids).last_hidden_state
        mean, logvar = moments[idx].chunk(2, dim=1)
        latents = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen)
        pred = unet(noise_sched.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
        if not recipe.unet_min_snr:
            return F.mse_loss(pred, noise)
        snr = alphas[t] / (1 - alphas[t])
        weight = snr.clamp(max=recipe.unet_min_snr) / snr
        return (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()

    losses = _loop("pretrain unet", recipe.unet_steps, unet.parameters(), recipe.unet_lr, step, weight_decay=0.0)
    unet.eval()
    scheduler = sd_scheduler()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out / "diffusion")
    metrics = evaluate_diffusion(pipe, out, recipe)
    metrics["final_loss"] = round(float(np.mean(losses[-50:])), 4)
    return StageReport("unet", metrics)


@torch.no_grad()
def evaluate_diffusion(pipe, out: Path, recipe: Recipe, guidance: float = 4.0) -> dict[str, JSONValue]:
    """Text -> image for held-out one-shape prompts: does the dominant colour match, and does the small CLIP
    pick the requested shape among the six? Saves a grid of the samples (``diffusion_samples.png``)."""
    from transformers import CLIPModel

    pipe.set_progress_bar_config(disable=True)
    n, steps = recipe.eval_prompts, recipe.eval_sampling_steps
    targets = W.scenes(n, split="test", seed=recipe.seed + 60, two=False)
    prompts = [W.describe(s, where=False) for s in targets]
    images = []
    for i in range(0, n, 12):
        gen = torch.Generator().manual_seed(recipe.seed + i)
        images += pipe(
            prompts[i : i + 12],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gen,
            height=W.IMAGE_SIZE,
            width=W.IMAGE_SIZE,
        ).images
    colour_ok = [W.dominant_colour(im) == s.things[0].colour for im, s in zip(images, targets, strict=True)]
    clip = CLIPModel.from_pretrained(out / "clip").eval()
    tok = load_clip_tokenizer(out)
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
    img = clip_embed_images(clip, pixels)
    shapes = clip_embed_texts(clip, tok, [f"a {s}" for s in W.SHAPES])
    pred = (img @ shapes.T).argmax(1).tolist()
    shape_ok = [W.SHAPES[p] == s.things[0].shape for p, s in zip(pred, targets, strict=True)]
    _grid(images, 6).save(out / "diffusion_samples.png")
    (out / "diffusion_samples.txt").write_text("\n".join(prompts) + "\n")
    return {
        "gen_dominant_colour_acc": round(float(np.mean(colour_ok)), 3),
        "gen_clip_shape_acc": round(float(np.mean(shape_ok)), 3),
        "prompts": n,
        "sampling_steps": steps,
        "guidance_scale": guidance,
    }


def _to_pil(x: torch.Tensor) -> list[Image.Image]:
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a, "RGB") for a in arr]


def _grid(images: list[Image.Image], columns: int) -> Image.Image:
    size = W.IMAGE_SIZE + 2
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * size, rows * size), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * size, (i // columns) * size))
    return grid


STAGES: dict[str, Callable[[Path, Recipe], StageReport]] = {
    "tokenizer": train_tokenizers,
    "clip": pretrain_clip,
    "lm": pretrain_lm,
    "vae": pretrain_vae,
    "unet": pretrain_unet,
}
