"""GILLMapper: from the LM's [IMG] hidden states to Stable Diffusion's text conditioning.

(B, r, d_lm) hidden states + the [IMG] tokens' input embeddings -> Linear -> Transformer encoder over the r
tokens; the decoder attends with ``num_queries`` learned queries -> Linear -> (B, num_queries, out_dim),
used as ``prompt_embeds``. Module names follow the published checkpoint (``fc``, ``tfm``, ``query_embs``);
the output projection, ``model`` there, is ``out`` here.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .config import MapperSpec


class GILLMapper(nn.Module):
    def __init__(self, in_dim: int, spec: MapperSpec):
        super().__init__()
        self.fc = nn.Linear(in_dim, spec.d_model)
        with warnings.catch_warnings():  # "enable_nested_tensor ... norm_first": expected, and not actionable
            warnings.simplefilter("ignore", UserWarning)
            self.tfm = nn.Transformer(
                d_model=spec.d_model,
                nhead=spec.num_heads,
                num_encoder_layers=spec.num_encoder_layers,
                num_decoder_layers=spec.num_decoder_layers,
                dim_feedforward=spec.dim_feedforward,
                dropout=0.0,
                batch_first=True,
                norm_first=True,
            )
        self.query_embs = nn.Parameter(torch.randn(1, spec.num_queries, spec.d_model))
        self.out = nn.Linear(spec.d_model, spec.out_dim)

    def forward(self, hidden: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        # hidden, token_embeds: (B, r, in_dim) -> (B, num_queries, out_dim)
        x = self.fc(hidden + token_embeds)
        x = self.tfm(x, self.query_embs.expand(x.shape[0], -1, -1))
        return self.out(x)
