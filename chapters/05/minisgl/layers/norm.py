"""RMSNorm (introduced in chapter 01).

RMSNorm rescales each vector to unit root-mean-square and then multiplies by a learned weight. Unlike
LayerNorm it neither subtracts the mean nor adds a bias. The statistic is computed in float32 even for
bfloat16 activations: a sum of 576 squares in bf16 loses too many bits.
"""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    # --8<-- [start:rmsnorm]
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)
    # --8<-- [end:rmsnorm]
