"""A reference Transformer, small enough to read in one sitting, with a selectable attention backend.

Every attention runs through `attend`, which is ``"flash"`` (flashattn_py's
kernels), ``"sdpa"`` (torch's scaled_dot_product_attention) or ``"naive"``
(softmax(QKᵀ/√d)V, flashattn_py.reference). Shapes in comments: B batch, T/S
sequence lengths, C model width, H heads, hd = C / H.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .functional import scaled_dot_product_attention
from .reference import attention_reference

Backend = Literal["flash", "sdpa", "naive"]
BACKENDS: tuple[Backend, ...] = ("flash", "sdpa", "naive")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: Backend, causal: bool = False,
           key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """q (B, H, T, hd), k and v (B, H, S, hd) -> (B, H, T, hd). key_padding_mask (B, S): True = padding."""
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S), True = keep
    if causal and mask is not None:  # SDPA takes one or the other: fold causality into the mask
        T, S = q.shape[-2], k.shape[-2]
        mask = mask & torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        causal = False
    if backend == "flash":
        return scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
    if backend == "naive":
        if dropout_p > 0:
            raise ValueError("the naive backend has no attention dropout; set it to 0")
        return attention_reference(q, k, v, causal=causal, attn_mask=mask)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


class SinusoidalPositionalEncoding(nn.Module):
    """PE[pos, 2i] = sin(pos / 10000^(2i/C)), PE[pos, 2i+1] = cos(...), added to the embeddings."""

    def __init__(self, d_model: int, max_len: int = 4096):
        super().__init__()
        pos = torch.arange(max_len)[:, None]
        freq = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(pos * freq)
        pe[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, C)
        return x + self.pe[: x.shape[1]].to(x.dtype)


class AttentionLayer(nn.Module):
    """Self-attention (context=None) or cross-attention over `context`."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, backend: Backend = "flash"):
        super().__init__()
        assert d_model % n_heads == 0
        self.n_heads, self.dropout, self.backend = n_heads, dropout, backend
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, causal: bool = False,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        context = x if context is None else context  # (B, S, C)
        S, H = context.shape[1], self.n_heads
        q = self.q_proj(x).view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, hd): a view, no copy
        k = self.k_proj(context).view(B, S, H, C // H).transpose(1, 2)  # (B, H, S, hd)
        v = self.v_proj(context).view(B, S, H, C // H).transpose(1, 2)
        y = attend(q, k, v, backend=self.backend, causal=causal, key_padding_mask=key_padding_mask,
                   dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EncoderLayer(nn.Module):
    """x = LN(x + SelfAttn(x)); x = LN(x + FFN(x))  (post-norm, as in "Attention Is All You Need")."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0, backend: Backend = "flash"):
        super().__init__()
        self.attn = AttentionLayer(d_model, n_heads, dropout, backend)
        self.ffn = FeedForward(d_model, d_ff, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attn(x, key_padding_mask=key_padding_mask)))
        return self.norm2(x + self.ffn(x))


class DecoderLayer(nn.Module):
    """Masked (causal) self-attention, cross-attention over the encoder's memory, FFN; residual + LN each."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0, backend: Backend = "flash"):
        super().__init__()
        self.self_attn = AttentionLayer(d_model, n_heads, dropout, backend)
        self.cross_attn = AttentionLayer(d_model, n_heads, dropout, backend)
        self.ffn = FeedForward(d_model, d_ff, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor,
                memory_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.self_attn(x, causal=True)))
        x = self.norm2(x + self.drop(self.cross_attn(x, memory, key_padding_mask=memory_key_padding_mask)))
        return self.norm3(x + self.ffn(x))


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder Transformer: src tokens (B, S), tgt tokens (B, T) -> logits (B, T, vocab)."""

    def __init__(self, vocab: int, d_model: int = 64, n_heads: int = 4, n_layers: int = 2, d_ff: int = 128,
                 dropout: float = 0.0, max_len: int = 512, backend: Backend = "flash"):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = SinusoidalPositionalEncoding(d_model, max_len)
        self.encoder = nn.ModuleList(EncoderLayer(d_model, n_heads, d_ff, dropout, backend) for _ in range(n_layers))
        self.decoder = nn.ModuleList(DecoderLayer(d_model, n_heads, d_ff, dropout, backend) for _ in range(n_layers))
        self.head = nn.Linear(d_model, vocab)
        self.scale = math.sqrt(d_model)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor,
                src_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        memory = self.pos(self.embed(src) * self.scale)  # (B, S, C)
        for layer in self.encoder:
            memory = layer(memory, src_key_padding_mask)
        x = self.pos(self.embed(tgt) * self.scale)  # (B, T, C)
        for layer in self.decoder:
            x = layer(x, memory, src_key_padding_mask)
        return self.head(x)  # (B, T, vocab)


class Block(nn.Module):
    """nanoGPT's block: x = x + Attn(LN(x)); x = x + MLP(LN(x))  (pre-norm, causal)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, backend: Backend = "flash"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = AttentionLayer(d_model, n_heads, dropout, backend)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model, 4 * d_model, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=True)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only language model: tokens (B, T) -> logits (B, T, vocab)."""

    def __init__(self, vocab: int, d_model: int = 64, n_heads: int = 4, n_layers: int = 2, dropout: float = 0.0,
                 max_len: int = 512, backend: Backend = "flash"):
        super().__init__()
        self.wte = nn.Embedding(vocab, d_model)
        self.pos = SinusoidalPositionalEncoding(d_model, max_len)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout, backend) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.pos(self.wte(idx))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)


def set_attention_backend(model: nn.Module, backend: Backend) -> nn.Module:
    """Point every AttentionLayer of a reference model at `backend`; returns the model."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for m in model.modules():
        if isinstance(m, AttentionLayer):
            m.backend = backend
    return model
