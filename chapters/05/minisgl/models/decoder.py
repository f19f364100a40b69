"""The decoder-only transformer, written from scratch (introduced in chapter 01).

One class serves Llama, Qwen2 and Qwen3; ``ModelConfig`` carries the few switches that differ. Every
layer is pre-norm:

    x = x + attention(rms_norm(x))
    x = x + mlp(rms_norm(x))

Activations are plain [tokens, hidden] matrices with no batch dimension: a batch of requests is laid
end to end, and only the attention backend knows which tokens belong together.

Under tensor parallelism every rank builds this same model from parallel layers (``layers/linear.py``,
``layers/embedding.py``), which read the rank and the TP size from ``distributed.tp_info()`` and keep
only their share of each weight. Between the layers, every rank holds the same full [tokens, hidden]
activations: the norms and the residual additions are computed on every rank, identically.
"""

import torch
from torch import nn

from ..attention import AttentionBackend
from ..layers import Attention, ParallelLMHead, RMSNorm, RotaryEmbedding, SwiGLU, VocabParallelEmbedding
from .config import ModelConfig


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(
            layer_id,
            config.hidden_size,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            qkv_bias=config.qkv_bias,
            o_bias=config.o_bias,
            qk_norm_eps=config.rms_norm_eps if config.qk_norm else None,
        )
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    # --8<-- [start:layer-forward]
    def forward(self, x, cos, sin, attention: AttentionBackend) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin, attention)
        return x + self.mlp(self.post_attn_norm(x))
    # --8<-- [end:layer-forward]


# --8<-- [start:model-init]
class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Small models reuse the embedding matrix as the output projection ("tied" embeddings).
        self.lm_head = (
            None if config.tie_word_embeddings else ParallelLMHead(config.vocab_size, config.hidden_size)
        )
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_position_embeddings)
    # --8<-- [end:model-init]

    # --8<-- [start:model-forward]
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend) -> torch.Tensor:
        """Run a batch's new tokens (``input_ids`` and ``positions``, [tokens] each, requests end to end) and
        return their final hidden states [tokens, hidden].

        ``attention`` has been prepared for this batch: it writes the new keys and values into the KV cache,
        where each request's earlier tokens must be already.
        """
        cos, sin = self.rotary(positions)  # computed once, shared by every layer
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, attention)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores over the whole vocabulary, on every rank, in float32 so that sampling sees every bit of them."""
        head = self.embed if self.lm_head is None else self.lm_head  # tied: the embedding's block scores
        return head.logits(hidden).float()
    # --8<-- [end:model-forward]
