"""The papers' combined training objective: every FROMAGe / GILL loss of one batch, weighted into one total.

For each batch (B examples of frozen image features and captions) two sequences go through the LM, laid out by
``fromage_gill.layout`` as inference lays them out, and four losses come out:

1. captioning: ``[visual tokens; BOS; prompt; caption; end]``, next-token loss on the caption (and end);
2. retrieval LM: ``[BOS; caption; [RET]]`` / ``[BOS; caption; [IMG0..r-1]]``, next-token loss on the image tokens,
   whose hidden states give the text embedding (and GILL's mapper input);
3. GILL: the mapper output against the caption's diffusion text-encoder output;
4. contrastive: text against image embeddings, with every process's examples as negatives.

The losses themselves are the small pure functions of ``losses``. After every optimizer step the published code
(FROMAGe and GILL) rescales the trained [RET]/[IMG] rows to the mean norm of the LM's own embedding rows, so the
new tokens stay on the scale the frozen LM expects (``renormalize_image_tokens``); untied output rows get the same
treatment against the LM's output rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..backbones import pad_token_id
from ..layout import caption_rows, layout, retrieval_rows
from ..model import input_embeddings
from .distributed import gather_with_grad
from .losses import LossWeights, contrastive_loss, l2_loss, next_token_loss, token_accuracy
from .precompute import encode_captions_for_diffusion

if TYPE_CHECKING:
    from ..model import GroundedLM

LOSS_NAMES = ("caption", "retrieval_lm", "contrastive", "generation")
# A history is a chat's earlier exchange: a question and its answer, each about as long as a caption, and their
# layout; longer ones keep their end (the turn just before)
MAX_HISTORY_TOKENS = 128


class Objective(nn.Module):
    """All published losses for one batch; a module so that accelerate can wrap it (DDP) for many processes."""

    def __init__(
        self,
        model: GroundedLM,
        tokenizer,
        *,
        weights: LossWeights,
        max_caption_tokens: int,
        accelerator,
        diffusion=None,
        caption_end: str = "",
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.weights = weights
        self.max_caption_tokens = max_caption_tokens
        self.accelerator = accelerator
        self.diffusion = diffusion  # for on-the-fly GILL targets; not a submodule (not saved, not wrapped)
        self.bos_id = tokenizer.bos_token_id
        self.pad_id = pad_token_id(tokenizer)
        self.ignore_ids = frozenset(
            i
            for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
            if i is not None
        )
        self.caption_end_ids = tokenizer(caption_end, add_special_tokens=False)["input_ids"] if caption_end else []
        if caption_end and (not self.caption_end_ids or set(self.caption_end_ids) & self.ignore_ids):
            raise ValueError(
                f"--caption-end {caption_end!r} tokenizes to {self.caption_end_ids}, which the loss "
                "cannot supervise (empty, or a BOS/EOS/pad/unk id it masks): pass the text that ends "
                "a chat turn, e.g. '\\n'"
            )

    def tokenize(self, captions: list[str]) -> list[list[int]]:
        return self.tokenizer(captions, add_special_tokens=False, truncation=True, max_length=self.max_caption_tokens)[
            "input_ids"
        ]

    def tokenize_history(self, history: str) -> list[int]:
        """A history's ids, cut to ``MAX_HISTORY_TOKENS`` keeping its end (the turn just before)."""
        return self.tokenizer(history, add_special_tokens=False)["input_ids"][-MAX_HISTORY_TOKENS:] if history else []

    def prompted(self, prompt: str, caption: str) -> tuple[list[int], list[int]]:
        """The ids of a captioning prompt and of the caption after it, tokenized as one text (the caption after a
        space unless the prompt ends in whitespace: ``Q: ...\\nA:`` + `` a cat``, as a chat lays out an answer), so
        the caption's first token is the one it is in a chat. Both are cut to ``max_caption_tokens`` (the prompt
        keeping its end)."""
        sep = "" if prompt[-1:].isspace() else " "
        head = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        whole = self.tokenizer(prompt + sep + caption, add_special_tokens=False)["input_ids"]
        if whole[: len(head)] == head:
            tail = whole[len(head) :]
        else:  # a merge across the seam: tokenize the caption on its own
            tail = self.tokenizer(sep + caption, add_special_tokens=False)["input_ids"]
        return head[-self.max_caption_tokens :], tail[: self.max_caption_tokens]

    def local_parts(
        self,
        features: torch.Tensor,
        captions: list[str],
        text_cond: torch.Tensor | None,
        concat: bool,
        queries: list[str] | None = None,
        prompts: list[str] | None = None,
        histories: list[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The per-process losses of a non-empty batch, and the [RET]/[IMG0] text and image embeddings for the
        contrastive loss. features (B, vision_dim) frozen image features. ``queries``: the text the image tokens
        follow in the retrieval and generation parts (default: the captions); captioning and the diffusion target
        always use the captions. ``prompts``: text read between each image and its caption in the captioning
        part ("" or None: none). ``histories``: text read first in both parts, before the image and before the
        query (a chat's earlier turns; "" or None: none)."""
        m = self.model
        cfg = m.config
        ids = self.tokenize(captions)
        out: dict[str, torch.Tensor] = {}

        # 1. Captioning: [visual tokens; BOS; prompt; caption; end] (+ the next example's, to teach interleaving).
        heads: list[list[int]] = [[] for _ in captions]
        targets = list(ids)
        for i, prompt in enumerate(prompts or []):
            if prompt:
                heads[i], targets[i] = self.prompted(prompt, captions[i])
        ended = [cap + self.caption_end_ids for cap in targets] if self.caption_end_ids else targets
        # Tokenized on its own, as a chat tokenizes the text before an image
        before = [self.tokenize_history(h) for h in histories] if histories and any(histories) else None
        lay = layout(
            caption_rows(ended, bos_id=self.bos_id, concat=concat, prompts=heads, histories=before),
            n_visual=cfg.n_visual_tokens,
            pad_id=self.pad_id,
            ignore_ids=self.ignore_ids,
        )
        lm_out = m(lay.input_ids, lay.attention_mask, features=features, visual_slot=lay.visual_slot)
        labels = lay.labels.to(lm_out.logits.device)
        out["caption"] = next_token_loss(lm_out.logits, labels)
        correct, counted = token_accuracy(lm_out.logits.detach(), labels)
        out["caption_correct"] = torch.tensor(float(correct))
        out["caption_counted"] = torch.tensor(float(counted))

        # 2. Retrieval LM: [BOS; caption (or query); [RET] | [IMG0..r-1]] -- teaches emitting the image tokens.
        query_ids = ids if queries is None or queries == captions else self.tokenize(queries)
        rows, first = retrieval_rows(query_ids, bos_id=self.bos_id, image_token_ids=m.image_token_ids, histories=before)
        lay = layout(rows, n_visual=cfg.n_visual_tokens, pad_id=self.pad_id, ignore_ids=self.ignore_ids)
        lm_out = m(lay.input_ids, lay.attention_mask)
        out["retrieval_lm"] = next_token_loss(lm_out.logits, lay.labels.to(lm_out.logits.device))
        hidden = lm_out.hidden  # (B, T, d)
        pos = torch.tensor(first, device=hidden.device)[:, None] + torch.arange(
            len(m.image_token_ids), device=hidden.device
        )
        img_hidden = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, r, d)
        out["text_emb"] = m.text_embedding(img_hidden[:, 0])
        out["image_emb"] = m.image_embedding(features)

        # 3. GILL: mapper output vs the caption's diffusion text-encoder output.
        if m.mapper is not None:
            if text_cond is None:
                text_cond = encode_captions_for_diffusion(self.diffusion, captions)
            out["generation"] = l2_loss(m.map_to_diffusion(img_hidden), text_cond.to(m.device))
        return out

    def forward(
        self,
        features: torch.Tensor,
        captions: list[str],
        text_cond: torch.Tensor | None,
        concat: bool,
        queries: list[str] | None = None,
        prompts: list[str] | None = None,
        histories: list[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The weighted ``total`` and each loss for this process's batch. B may be 0 on a process whose images
        were all unreadable: it still takes part in the gather of the contrastive loss."""
        m, w = self.model, self.weights
        # Touch every trained parameter so that each process's backward covers the same set (DDP requirement).
        total = sum(p.sum() for p in m.parameters() if p.requires_grad) * 0.0
        out: dict[str, torch.Tensor] = {}
        if features.shape[0]:
            out = self.local_parts(features, captions, text_cond, concat, queries, prompts, histories)
            text_emb, image_emb = out.pop("text_emb"), out.pop("image_emb")
            total = total + w.caption * out["caption"] + w.retrieval_lm * out["retrieval_lm"]
            if "generation" in out:
                total = total + w.generation * out["generation"]
        else:
            text_emb = image_emb = torch.zeros(0, m.config.retrieval_dim, device=m.device)
        # 4. Contrastive, with every process's examples as negatives.
        all_text = gather_with_grad(text_emb, self.accelerator)
        all_image = gather_with_grad(image_emb, self.accelerator)
        if all_text.shape[0]:
            out["contrastive"] = contrastive_loss(all_text, all_image, m.logit_scale)
            total = total + w.contrastive * out["contrastive"]
        out["total"] = torch.as_tensor(total)  # already a tensor unless no parameter trains
        return out


def check_vocabulary(model: GroundedLM, tokenizer) -> None:
    """Every id the training feeds or predicts must exist in the LM (or be one of the new image tokens)."""
    n_base = model.n_base
    head = model.lm.get_output_embeddings()
    rows = head.weight.shape[0] if head is not None else 0
    if rows < n_base:
        raise ValueError(
            f"the LM's output layer has {rows} rows but its tokenizer {n_base} tokens: token ids "
            f"{rows}..{n_base - 1} have no logits. Use the tokenizer that belongs to the LM "
            f"(lm.tokenizer) or a matching lm.config.vocab_size"
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        i = getattr(tokenizer, name, None)
        if i is not None and not 0 <= i < n_base:
            raise ValueError(
                f"the tokenizer's {name} is {i}, beyond the LM vocabulary of {n_base}; fix the "
                f"tokenizer's special tokens or lm.config"
            )


@torch.no_grad()
def mean_embedding_norm(model: GroundedLM) -> tuple[float, float | None]:
    """Mean L2 norm of the LM's input embedding rows (and of its output rows when untied)."""

    def mean_norm(weight: torch.Tensor) -> float:
        return float(weight[: model.n_base].float().norm(dim=-1).mean())

    head = model.lm.get_output_embeddings()
    out = None if model.tied or head is None else mean_norm(head.weight)
    return mean_norm(input_embeddings(model.lm).weight), out


@torch.no_grad()
def renormalize_image_tokens(model: GroundedLM, norms: tuple[float, float | None]) -> None:
    """Rescale every trained image-token row to ``norms`` (from ``mean_embedding_norm``): input rows, output rows."""
    rows = [(model.image_token_embeddings, norms[0])]
    if model.image_token_output is not None:
        assert norms[1] is not None, "an untied LM's output rows have a norm (mean_embedding_norm)"
        rows.append((model.image_token_output, norms[1]))
    for param, norm in rows:
        param.mul_(norm / param.float().norm(dim=-1, keepdim=True).clamp(min=1e-12))
