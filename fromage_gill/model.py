"""GroundedLM: a frozen causal LM and a frozen vision encoder joined by small trained layers.

Trained layers (everything outside ``lm`` and ``vision``):
- ``visual_embeddings``: vision features -> ``n_visual_tokens`` LM input embeddings (the input mapping);
- ``image_token_embeddings``: the rows of the new tokens ([RET] or [IMG0..r-1]), kept in their own parameter so
  the LM's embedding matrix stays frozen; ``image_token_output`` holds their output rows for LMs whose input
  and output embeddings are untied (tied LMs reuse the input rows, as OPT does in the published models);
- ``visual_fc`` / ``text_fc`` / ``logit_scale``: the two sides of the retrieval space and its temperature;
- GILL only: ``mapper`` (GILLMapper to the diffusion conditioning space) and ``decision`` (retrieve vs generate).

The new tokens get ids ``n_base .. n_base + r - 1`` right after the LM tokenizer's vocabulary; logits are
``[LM logits for the n_base real tokens ; hidden @ image_token_rows.T]``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import VisionEncoder, cache_argument, input_embeddings
from .config import ModelConfig
from .devices import execution_device
from .layout import splice_visual
from .mapper import GILLMapper
from .paths import portable_source

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DECISION_GENERATE, DECISION_RETRIEVE = 0, 1  # output order of the published decision head
FROZEN = ("lm", "vision")


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # (B, T', n_base + r) float32; T' = T, or 1 with last_only
    hidden: torch.Tensor  # (B, T, d) last-layer hidden states (after the LM's final norm)
    past_key_values: object | None  # the LM's cache, to continue decoding


class GroundedLM(nn.Module):
    def __init__(self, config: ModelConfig, lm: PreTrainedModel, vision: VisionEncoder, image_token_ids: list[int]):
        super().__init__()
        r = config.num_image_tokens
        if len(image_token_ids) != r or image_token_ids != list(range(image_token_ids[0], image_token_ids[0] + r)):
            raise ValueError(f"image token ids must be {r} consecutive ids after the vocabulary, got {image_token_ids}")
        self.config = config
        self.lm = lm
        self.vision = vision
        self.n_base = image_token_ids[0]
        self.image_token_ids = list(image_token_ids)
        emb = input_embeddings(lm)
        out = lm.get_output_embeddings()
        if self.n_base > emb.num_embeddings:
            raise ValueError(
                f"the tokenizer has {self.n_base} tokens but the LM's embedding matrix only {emb.num_embeddings} "
                f"rows: they do not belong together (check lm.tokenizer)"
            )
        d = emb.embedding_dim
        self.hidden_size = d
        self.tied = out is not None and out.weight is emb.weight

        # New rows start at the mean of the existing ones (plus a little noise so they differ): their logits then
        # begin near the average token's, neither dominating nor unreachable.
        if emb.weight.is_meta and not hasattr(emb, "_hf_hook"):
            mean, std = torch.zeros(d), 1.0  # a skeleton LM (checkpoint conversion): the load overwrites these
        else:
            with torch.no_grad():  # through the module, so weights offloaded by accelerate are fetched
                base = emb(torch.arange(self.n_base, device=execution_device(emb))).float()
                mean, std = base.mean(0).cpu(), base.std().item()
        self.image_token_embeddings = nn.Parameter(mean.repeat(r, 1) + 0.02 * std * torch.randn(r, d))
        self.image_token_output = None if self.tied else nn.Parameter(self.image_token_embeddings.detach().clone())
        self.visual_embeddings = nn.Linear(vision.out_dim, d * config.n_visual_tokens)
        self.visual_fc = nn.Linear(vision.out_dim, config.retrieval_dim)
        self.text_fc = nn.Linear(d, config.retrieval_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.mapper = GILLMapper(d, config.mapper) if config.mapper is not None else None
        self.decision = (
            nn.Sequential(nn.Dropout(config.decision_dropout), nn.Linear(d, 2)) if config.decision_head else None
        )

    # ------------------------------------------------------------------------------------ housekeeping

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if n.split(".")[0] not in FROZEN}

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.trained_parameters().items()}

    def trained_layers_to(self, device: torch.device | str, dtype: torch.dtype) -> GroundedLM:
        """Move only the trained layers; the frozen LM may be quantized or spread over devices."""
        for name, child in self.named_children():
            if name not in FROZEN:
                child.to(device=device, dtype=dtype)
        for p in self.parameters(recurse=False):
            p.data = p.data.to(device=device, dtype=dtype)
        return self

    def train(self, mode: bool = True) -> GroundedLM:
        super().train(mode)
        self.lm.eval()  # frozen parts never use dropout, even while the trained layers train
        self.vision.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.visual_fc.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_fc.weight.dtype

    @property
    def vocab_size(self) -> int:
        return self.n_base + len(self.image_token_ids)

    @property
    def lm_device(self) -> torch.device:
        """Where the LM takes its inputs (with accelerate offloading, the hook's execution device)."""
        return execution_device(input_embeddings(self.lm))

    def retrieval_fingerprint(self) -> str:
        """Identifies the image side of the retrieval space: an index built by another model is refused."""
        vision = self.config.to_dict()["vision"]
        vision["source"] = portable_source(vision["source"])  # the checkout's place must not change the space
        h = hashlib.sha256(json.dumps(vision, sort_keys=True).encode())
        for t in (self.visual_fc.weight, self.visual_fc.bias):
            h.update(t.detach().float().cpu().numpy().tobytes())
        return f"{self.config.name}:{h.hexdigest()[:16]}"

    # ------------------------------------------------------------------------------------ the model, top to bottom

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        features: torch.Tensor | None = None,
        visual_slot: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: object | None = None,
        use_cache: bool = False,
        logits: str = "all",
    ) -> LMOutput:
        """Token ids with image slots in; logits over the text and image tokens out.

        ``input_ids`` (B, T): text tokens and the new image tokens ([RET] / [IMG0..r-1]); ``visual_slot`` (B, T): the
        row of the flattened (N * n_visual, d) visual tokens each position shows, or -1 (``layout.layout`` lays both
        out, for training and inference alike); ``features`` (N, vision_dim): the frozen vision features of those N
        images (``encode_images``). ``logits``: "all", "last" (decoding) or "none" (hidden states only)."""
        x = self.embed_tokens(input_ids)  # (B, T, d); image tokens take their own trained rows
        if features is not None:
            visual = self.visual_tokens(features)  # (N, n_visual, d): the input mapping
            x = splice_visual(x, visual, visual_slot)  # each visual slot takes its image's embedding
        return self.forward_lm(
            x,
            attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            logits=logits,
        )  # frozen LM, then [LM head ; image-token rows]

    # ------------------------------------------------------------------------------------ inputs

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, vision_dim) frozen features, on the trained layers' device and dtype."""
        return self.vision(pixel_values).to(device=self.device, dtype=self.dtype)

    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(N, vision_dim) -> (N, n_visual_tokens, d): the input mapping."""
        x = self.visual_embeddings(features.to(device=self.device, dtype=self.dtype))
        return x.view(x.shape[0], self.config.n_visual_tokens, self.hidden_size)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids in [0, vocab_size) -> (B, T, d) on the trained layers' device; new tokens use their own rows."""
        if input_ids.numel() and int(input_ids.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(input_ids.max())} is beyond the vocabulary of {self.vocab_size}")
        emb = input_embeddings(self.lm)
        is_new = (input_ids >= self.n_base).to(self.device)
        base = emb(input_ids.masked_fill(input_ids >= self.n_base, 0).to(self.lm_device))
        new = self.image_token_embeddings[(input_ids.to(self.device) - self.n_base).clamp(min=0)]
        return torch.where(is_new[..., None], new, base.to(device=self.device, dtype=self.dtype))

    # ------------------------------------------------------------------------------------ the LM

    def forward_lm(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        past_key_values: object | None = None,
        use_cache: bool = False,
        logits: str = "all",
    ) -> LMOutput:
        """Run the frozen LM on embeddings. ``logits``: "all", "last" (decoding) or "none" (hidden states only)."""
        device = self.lm_device
        kwargs = {}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids.to(device)
        base = self.lm.base_model
        cache_name = cache_argument(base)
        kwargs[cache_name] = past_key_values
        out = base(
            inputs_embeds=inputs_embeds.to(device=device, dtype=self._lm_dtype()),
            attention_mask=None if attention_mask is None else attention_mask.to(device),
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state
        result = None
        if logits != "none":
            h = hidden[:, -1:] if logits == "last" else hidden
            result = self.logits(h)
        return LMOutput(logits=result, hidden=hidden.to(self.device), past_key_values=getattr(out, cache_name))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T, n_base + r) float32: the LM head's rows for real tokens, ours for the new ones."""
        head = self.lm.get_output_embeddings()
        assert head is not None, "a causal LM has an output head"
        base = head(hidden.to(execution_device(head)))[..., : self.n_base].float()
        rows = self.image_token_output if self.image_token_output is not None else self.image_token_embeddings
        new = hidden.to(device=rows.device, dtype=rows.dtype) @ rows.T
        return torch.cat([base, new.float().to(base.device)], dim=-1)

    def _lm_dtype(self) -> torch.dtype:
        return input_embeddings(self.lm).weight.dtype

    # ------------------------------------------------------------------------------------ outputs

    def text_embedding(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, d) hidden state at [RET] / [IMG0] -> (N, retrieval_dim), L2-normalised."""
        return F.normalize(self.text_fc(hidden.to(device=self.device, dtype=self.dtype)).float(), dim=-1)

    def image_embedding(self, features: torch.Tensor) -> torch.Tensor:
        """(N, vision_dim) -> (N, retrieval_dim), L2-normalised: what a retrieval index stores."""
        return F.normalize(self.visual_fc(features.to(device=self.device, dtype=self.dtype)).float(), dim=-1)

    def retrieval_logits(self, text_emb: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
        """(N, D) x (M, D) normalised -> (N, M) scaled similarities, as trained by the contrastive loss."""
        return self.logit_scale.exp().float() * text_emb @ image_emb.T

    def map_to_diffusion(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, r, d) hidden states of [IMG0..r-1] -> (N, num_queries, out_dim) ``prompt_embeds``."""
        if self.mapper is None:
            raise ValueError(f"{self.config.name} has no GILLMapper: it can retrieve images but not generate them")
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        tokens = self.image_token_embeddings.unsqueeze(0).expand(hidden.shape[0], -1, -1)
        return self.mapper(hidden, tokens)

    def decide(self, hidden_img0: torch.Tensor) -> torch.Tensor:
        """(N, d) hidden state at [IMG0] -> (N, 2) probabilities [generate, retrieve]."""
        if self.decision is None:
            raise ValueError(f"{self.config.name} has no decision head")
        return self.decision(hidden_img0.to(device=self.device, dtype=self.dtype)).float().softmax(-1)
