"""The LSTM language-model baseline: `LSTMConfig` and `LSTMLanguageModel`, in forward order.

A plain word-level LSTM LM (Zaremba et al. 2014, https://arxiv.org/abs/1409.2329):
embedding → dropout → `nn.LSTM` (n_layer layers, dropout between them) → dropout → linear head,
the head tied to the embedding by default (Press & Wolf 2017, https://arxiv.org/abs/1608.05859).
It is the seeds' baseline against the Transformer: same `model(ids) -> logits [B, T, V]`
contract, so the one training loop trains it unchanged.

Recurrent state instead of a KV cache: `forward_state(ids, state)` carries the LSTM's (h, c)
from one call to the next, so generation runs the prompt once (`prefill`) and then one token
per `decode_step`, each in constant time and memory. `max_seq_len` is only the training
context (the BPTT length of the batches); generation is not limited by it.

Parameter names are torch's own (`embed_tokens.weight`, `lstm.weight_ih_l0`, …, `lm_head.weight`)
and `model/formats` stores them as they are; there is no Hugging Face LSTM LM to map them to.

Shapes: B batch, T tokens, L n_layer, C d_model (embedding and hidden size), V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.transformer import ConfigDict

LSTMState = tuple[torch.Tensor, torch.Tensor]
"""The LSTM's (h, c), each [L, B, C]."""


@dataclass
class LSTMConfig(ConfigDict):
    """Shape of an LSTM language model."""

    arch: Literal["lstm"] = "lstm"
    vocab_size: int = 32000
    d_model: int = 256
    """Embedding size and LSTM hidden size (one size, so the head can be tied to the embedding)."""
    n_layer: int = 2
    max_seq_len: int = 64
    """Training context (BPTT length). Generation is not limited by it: the state carries on."""
    dropout: float = 0.0
    """On the embeddings, between LSTM layers and before the head."""
    tie_embeddings: bool = True
    init_std: float = 0.02
    """Standard deviation of the embedding (and untied head) init."""

    def __post_init__(self) -> None:
        if self.arch != "lstm":
            raise ValueError(f"model.arch must be 'lstm' for an LSTMConfig, got {self.arch!r}")
        for name in ("vocab_size", "d_model", "n_layer", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(
                f"model.tie_embeddings must be true or false, got {self.tie_embeddings!r}"
            )
        if not (math.isfinite(self.init_std) and self.init_std > 0):
            raise ValueError(f"model.init_std must be positive, got {self.init_std}")

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        c = self.d_model
        # Per layer: W_ih and W_hh [4C, C] each, b_ih and b_hh [4C] each (torch keeps both).
        per_layer = 2 * 4 * c * c + 2 * 4 * c
        emb = self.vocab_size * c * (1 if self.tie_embeddings else 2)
        return self.n_layer * per_layer + emb


class LSTMLanguageModel(nn.Module):
    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.config = config
        c = config.d_model
        self.embed_tokens = nn.Embedding(config.vocab_size, c)
        # nn.LSTM applies its dropout between layers only (not after the last one).
        between = config.dropout if config.n_layer > 1 else 0.0
        self.lstm = nn.LSTM(c, c, num_layers=config.n_layer, batch_first=True, dropout=between)
        self.lm_head = nn.Linear(c, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Embedding (and untied head) N(0, init_std); LSTM matrices U(±1/√C) as torch does;
        biases 0 except the forget gate's, 1 (Jozefowicz et al. 2015,
        https://proceedings.mlr.press/v37/jozefowicz15.pdf), so the cell remembers at first."""
        std = self.config.init_std
        c = self.config.d_model
        nn.init.normal_(self.embed_tokens.weight, 0.0, std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, std)
        bound = 1.0 / math.sqrt(c)
        for name, p in self.lstm.named_parameters():
            if name.startswith("weight"):
                nn.init.uniform_(p, -bound, bound)
            else:
                nn.init.zeros_(p)
                if name.startswith("bias_ih"):  # torch's gate order: input, forget, cell, output
                    with torch.no_grad():
                        p[c : 2 * c].fill_(1.0)

    def forward_state(
        self,
        ids: torch.Tensor,  # [B, T]
        state: LSTMState | None = None,
        *,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, LSTMState]:
        """Logits [B, T, V] (or [B, 1, V] with `last_only`) and the state after the last token.

        STATE is the one a previous call returned (None: start of the text); feeding a text in
        pieces gives the same logits as feeding it whole.
        """
        p = self.config.dropout
        x = self.embed_tokens(ids)  # [B, T, C]
        if p:
            x = F.dropout(x, p, self.training)
        h, new_state = self.lstm(x, state)  # [B, T, C]; (h, c) each [L, B, C]
        if last_only:
            h = h[:, -1:]
        if p:
            h = F.dropout(h, p, self.training)
        return self.lm_head(h), new_state

    def forward(self, ids: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] from the start of the text (zero state)."""
        return self.forward_state(ids, None, last_only=last_only)[0]


# ---------------------------------------------------------------------------------------------
# The two inference hot paths (the recurrent counterparts of `transformer.prefill` and
# `transformer.decode_step`): the caller keeps the state and passes it back in.


@torch.inference_mode()
def prefill(
    model: LSTMLanguageModel, ids: torch.Tensor, state: LSTMState | None = None
) -> tuple[torch.Tensor, LSTMState]:
    """Run prompt tokens ids [B, T] from STATE; logits of the last one [B, V] and the new state."""
    logits, new_state = model.forward_state(ids, state, last_only=True)
    return logits[:, -1], new_state


@torch.inference_mode()
def decode_step(
    model: LSTMLanguageModel, ids: torch.Tensor, state: LSTMState
) -> tuple[torch.Tensor, LSTMState]:
    """One new token per row: ids [B] → logits [B, V] and the new state."""
    logits, new_state = model.forward_state(ids.unsqueeze(1), state)
    return logits[:, -1], new_state
