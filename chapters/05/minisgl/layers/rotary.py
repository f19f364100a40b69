"""Rotary position embedding, RoPE (introduced in chapter 01).

RoPE tells attention where each token is by rotating pairs of channels of the query and key vectors by
an angle proportional to the token's position. Channel ``i`` of the first half is paired with channel
``i`` of the second half (the "rotate half" layout that Hugging Face checkpoints use), and pair ``i``
turns at frequency ``theta ** (-2i / head_dim)``. Because both q and k are rotated, their dot product
depends only on the distance between the two positions.

The cos/sin tables are computed once for every position the model supports.
"""

import torch


# --8<-- [start:rope-tables]
class RotaryEmbedding:
    """Precomputed cos/sin tables for positions 0 .. max_positions - 1."""

    def __init__(self, head_dim: int, theta: float, max_positions: int):
        # Built on the CPU explicitly, even when the model around it is built on the meta device.
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32, device="cpu"), inv_freq)
        self.cos, self.sin = angles.cos(), angles.sin()  # [max_positions, head_dim // 2]

    def to(self, device, dtype: torch.dtype) -> "RotaryEmbedding":
        self.cos, self.sin = self.cos.to(device, dtype), self.sin.to(device, dtype)
        return self

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos and sin of every position in ``positions`` [tokens]: two [tokens, head_dim // 2]."""
        return self.cos[positions], self.sin[positions]
# --8<-- [end:rope-tables]


# --8<-- [start:apply-rotary]
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + head_dim/2) of x [tokens, heads, head_dim] by per-token angles.

    cos and sin have shape [tokens, head_dim // 2].
    """
    # --8<-- [start:ex-rope]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    # --8<-- [end:ex-rope]
# --8<-- [end:apply-rotary]
