"""The SwiGLU feed-forward block (introduced in chapter 01).

``down(silu(gate(x)) * up(x))``: a gated MLP. The gate and up projections read the same input, so they
are stored as one fused matrix and computed with one matrix multiply; the loader fills the two halves
from the checkpoint's separate ``gate_proj`` and ``up_proj`` tensors.
"""

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)

    # --8<-- [start:swiglu]
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)
    # --8<-- [end:swiglu]
