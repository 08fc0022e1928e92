"""The book's GPTModel (chapter 4) with fused kernels and the book's state_dict keys.

Same modules, names and parameter shapes as the book, so chapter 4's own ``GPTModel`` loads a saved
``model.safetensors`` (its causal-mask buffers aside) and gives the same logits. What differs is how
the same math is computed: ``scaled_dot_product_attention(is_causal=True)`` instead of a stored mask
and an explicit softmax, ``F.layer_norm`` (eps 1e-5, biased variance, as the book's LayerNorm) and
``F.gelu(approximate="tanh")`` (the book's GELU formula). The modules are created in the book's order,
so the same seed gives the same initial weights as the book's code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# config.json's "model" section, in the book's GPT_CONFIG_124M form.
GPT_CONFIG_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")


class MultiHeadAttention(nn.Module):
    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = dropout  # applied to the attention weights, as the book's nn.Dropout is

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, num_tokens, _ = x.shape
        q, k, v = (
            w(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
            for w in (self.W_query, self.W_key, self.W_value)
        )
        context = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.out_proj(context.transpose(1, 2).reshape(b, num_tokens, self.d_out))


class LayerNorm(nn.Module):
    def __init__(self, emb_dim: int):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class GELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]), GELU(), nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"],
            qkv_bias=cfg["qkv_bias"],
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """``GPTModel(cfg)`` with the book's GPT_CONFIG dict; ``model(token_ids)`` gives the logits."""

    def __init__(self, cfg: dict[str, Any], pad_vocab_to: int = 1):
        super().__init__()
        self.cfg = {k: cfg[k] for k in GPT_CONFIG_KEYS}
        self.vocab_size = cfg["vocab_size"]
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        self.padded_rows = -cfg["vocab_size"] % pad_vocab_to
        if self.padded_rows:
            self._pad_vocab()

    def _pad_vocab(self) -> None:
        """GPU matrix products are fastest with sizes divisible by 64 (the book's bonus: 50257 -> 50304).
        The extra rows are zeros after the book's own initialisation (so the same seed gives the same
        model), are never looked up, and their logits are cut off, so they never learn anything; the
        state_dict keeps the book's shapes."""
        for module in (self.tok_emb, self.out_head):
            w = module.weight.data
            module.weight = nn.Parameter(torch.cat([w, w.new_zeros(self.padded_rows, w.shape[1])]))
        self._register_state_dict_hook(_unpad_state_dict)
        self._register_load_state_dict_pre_hook(_pad_state_dict, with_module=True)

    def forward(self, in_idx: torch.Tensor) -> torch.Tensor:
        seq_len = in_idx.shape[1]
        # The position table is read with a slice: no arange tensor to build on every call.
        x = self.tok_emb(in_idx) + self.pos_emb.weight[:seq_len]
        x = self.trf_blocks(self.drop_emb(x))
        logits = self.out_head(self.final_norm(x))
        return logits[..., : self.vocab_size] if self.padded_rows else logits


PADDED = ("tok_emb.weight", "out_head.weight")


def _unpad_state_dict(module: GPTModel, state_dict, prefix: str, local_metadata) -> None:
    # A copy, not a view: safetensors (accelerate's checkpoints) refuses a tensor that covers only part of
    # its storage, so a view of the padded parameter could be saved but not loaded back.
    for name in PADDED:
        state_dict[prefix + name] = state_dict[prefix + name][: module.vocab_size].clone()


def _pad_state_dict(module: GPTModel, state_dict, prefix: str, *args) -> None:
    for name in PADDED:
        w = state_dict.get(prefix + name)
        if w is not None and w.shape[0] == module.vocab_size:
            state_dict[prefix + name] = torch.cat([w, w.new_zeros(module.padded_rows, w.shape[1])])


def flops_per_token(cfg: dict[str, Any]) -> float:
    """Model FLOPs of one training token (forward and backward): 6 per weight a matrix product uses, plus
    attention's scores and weighted sums (PaLM's appendix B; nanoGPT's estimate_mfu). The embedding tables
    are looked up, not multiplied, so they do not count; the output head does. About 0.86 GFLOP for GPT-2
    124M at context 1024."""
    emb, layers, context = cfg["emb_dim"], cfg["n_layers"], cfg["context_length"]
    qkv_bias = 3 * emb if cfg["qkv_bias"] else 0
    per_block = 3 * emb * emb + qkv_bias + (emb * emb + emb) + (8 * emb * emb + 5 * emb) + 4 * emb
    matmul_weights = layers * per_block + 2 * emb + cfg["vocab_size"] * emb
    return 6.0 * matmul_weights + 12.0 * layers * context * emb
