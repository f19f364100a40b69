"""The SwiGLU feed-forward block (introduced in chapter 01).

``down(silu(gate(x)) * up(x))``: a gated MLP. The gate and up projections read the same input, so they
are stored as one fused matrix and computed with one matrix multiply; the loader fills the two halves
from the checkpoint's separate ``gate_proj`` and ``up_proj`` tensors.

With tensor parallelism each rank holds a slice of the intermediate features: its rows of gate and of
up (column-parallel), the matching columns of down (row-parallel). SiLU and the product act feature by
feature, so they need nothing from the other ranks; down's all-reduce sums the ranks' parts.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .linear import MergedColumnParallelLinear, RowParallelLinear


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up = MergedColumnParallelLinear(hidden_size, [intermediate_size, intermediate_size], bias=False)
        self.down = RowParallelLinear(intermediate_size, hidden_size, bias=False)

    # --8<-- [start:swiglu]
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)
    # --8<-- [end:swiglu]
