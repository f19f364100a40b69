"""Linear layers split across tensor-parallel ranks (introduced in chapter 04).

A linear layer ``y = x W^T + b`` with ``W`` of shape [out, in] can be cut two ways:

- **column-parallel**: each rank holds some *output* rows of ``W`` (and of ``b``) and computes those
  features of ``y``, from the whole input. No communication: each rank ends with a slice of ``y``.
- **row-parallel**: each rank holds some *input* columns of ``W`` and reads only those features of
  ``x``, which is exactly the slice a column-parallel layer left it. Each rank's product is a partial
  sum of the whole ``y``; an all-reduce adds them up, and every rank has all of ``y``.

A transformer block pairs them: q/k/v (column, split by heads) then o (row); gate/up (column) then
down (row). One all-reduce per pair, two per layer; everything between (rotary, attention per head,
SiLU) works on each rank's slice alone.

The fused layers stack several checkpoint matrices (q, k and v; gate and up). Each is split on its
own, so that every rank holds its share of each one, in the same order. A layer describes each part it
holds with a ``Shard``: which rows of which checkpoint tensor, copied where. The weight loader
(``models/weights.py``) asks the layers for their shards and cuts every checkpoint tensor as it reads
it, so no rank ever holds the whole model.

At TP size 1 every layer holds the whole matrix, the collectives do nothing, and the results are
bit for bit those of ``nn.Linear``.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce, tp_info


# --8<-- [start:linear]
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, or oneDNN's matrix product on a prepacked copy of the weight where ``prepack_for_cpu``
    made one (chapter 06): the same numbers, bit for bit, faster; or the quantized product where
    ``quantize.quantize_model`` gave the weight one that takes ``x`` (chapter 06, ``--quantization``)."""
    quantized = getattr(weight, "quantized", None)
    if quantized is not None and quantized.takes(x):
        return quantized(x, bias)
    packed = getattr(weight, "packed", None)
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def prepack_for_cpu(model: nn.Module) -> int:
    """Give every bfloat16 weight on the CPU a copy in oneDNN's blocked layout (introduced in chapter 06);
    returns how many.

    Decoding one request multiplies a single row by each weight matrix: the time is reading the weight.
    Measured on this course's CPU, ``F.linear`` reads a bfloat16 weight at 14-24 GB/s for one row, and
    the same product on a weight laid out in the blocks oneDNN's kernel walks runs 2 to 2.7 times faster
    (1.3-1.6x for 32 rows), with identical results. The packed copy lives beside the weight (``.packed``):
    the embedding still looks rows up in the plain one.
    """
    mkldnn = torch.backends.mkldnn
    if not (mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return 0
    packed = 0
    lookup_only = embedding_only_looked_up(model)
    for module in model.modules():
        if module is lookup_only:  # no product to speed up
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.dtype == torch.bfloat16 \
                and weight.device.type == "cpu" and not isinstance(module, nn.Embedding) \
                and not takes_every_input(getattr(weight, "quantized", None)):
            weight.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
            packed += 1
    return packed
# --8<-- [end:linear]


def embedding_only_looked_up(model: nn.Module) -> nn.Module | None:
    """The model's token embedding where it only looks rows up (an untied LM head has a weight of its own);
    None where it is tied, since its weight is then also the LM head's product."""
    return getattr(model, "embed", None) if getattr(model, "lm_head", None) is not None else None


def lm_head_of(model: nn.Module) -> nn.Module | None:
    """The module whose weight scores the vocabulary: the LM head, or a tied model's embedding."""
    head = getattr(model, "lm_head", None)
    return head if head is not None else getattr(model, "embed", None)


def takes_every_input(quantized) -> bool:
    """Whether a quantized product (``quantize.Int8Weight``, ``Int4Weight``) replaces the float one for every
    input: then the float weight is never multiplied, and packing it would be wasted."""
    return quantized is not None and quantized.max_rows is None


# --8<-- [start:shard]
@dataclass
class Shard:
    """Where this rank's part of one checkpoint tensor goes.

    The checkpoint tensor has shape ``full_shape``; this rank keeps ``target.shape[dim]`` of its rows
    along ``dim``, from ``start`` on, and copies them into ``target`` (a view of one of our parameters).
    Rows past the end of the checkpoint tensor (the padding of a vocabulary that the ranks do not split
    evenly) are zeros.
    """

    target: torch.Tensor
    full_shape: tuple[int, ...]
    dim: int = 0
    start: int = 0

    def load(self, tensor: torch.Tensor) -> None:
        size, available = self.target.shape[self.dim], tensor.shape[self.dim] - self.start
        piece = tensor.narrow(self.dim, self.start, min(size, available))
        self.target.narrow(self.dim, 0, piece.shape[self.dim]).copy_(piece)  # casts to our dtype and device
        self.target.narrow(self.dim, piece.shape[self.dim], size - piece.shape[self.dim]).zero_()
# --8<-- [end:shard]


def whole(param: torch.Tensor) -> Shard:
    """A parameter every rank holds in full (a norm's weight, a row-parallel bias)."""
    return Shard(param.data, tuple(param.shape))


def divide(total: int, size: int, what: str) -> int:
    if total % size:
        raise ValueError(f"TP size {size} does not divide the {total} {what}")
    return total // size


# --8<-- [start:kv-heads]
def kv_head_shard(num_kv_heads: int, rank: int, size: int) -> tuple[int, int]:
    """The KV heads ``rank`` of ``size`` holds: (first, count).

    Query heads are always split evenly. With at least as many KV heads as ranks, the KV heads are
    split evenly too. With fewer, ranks share a KV head: each holds one copy of the one KV head its
    query heads read (query head h reads KV head ``h * num_kv_heads // num_heads``).
    """
    # --8<-- [start:ex-kv-heads]
    if num_kv_heads >= size:  # an even split, like the query heads
        count = num_kv_heads // size
        return rank * count, count
    return rank * num_kv_heads // size, 1  # size / num_kv_heads ranks in a row share each KV head
    # --8<-- [end:ex-kv-heads]
# --8<-- [end:kv-heads]


class Part(NamedTuple):
    """What this rank holds of one checkpoint matrix of a column-parallel layer: ``rows`` of its output
    rows, from ``start`` on, out of ``full``."""

    rows: int
    start: int
    full: int


def even_part(full: int) -> Part:
    tp = tp_info()
    rows = divide(full, tp.size, "output features")
    return Part(rows, tp.rank * rows, full)


# --8<-- [start:column-parallel]
class ColumnParallelLinear(nn.Module):
    """``x W^T + b`` with the output rows of ``W`` and ``b`` split across ranks: this rank computes its
    slice of the output features, from the whole input, without talking to the others.

    A fused layer stacks several checkpoint matrices (``parts``), each split on its own; by default the
    layer is one matrix, split evenly.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, parts: list[Part] | None = None):
        super().__init__()
        self.parts = parts or [even_part(out_features)]
        rows = sum(part.rows for part in self.parts)
        self.weight = nn.Parameter(torch.empty(rows, in_features))
        self.bias = nn.Parameter(torch.empty(rows)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def shard(self, name: str = "weight", part: int = 0) -> Shard:
        """Where this rank's rows of checkpoint matrix number ``part`` go in our parameter ``name``."""
        rows, start, full = self.parts[part]
        offset = sum(p.rows for p in self.parts[:part])  # the parts lie one after the other
        param = getattr(self, name)
        return Shard(param.data.narrow(0, offset, rows), (full, *param.shape[1:]), dim=0, start=start)
# --8<-- [end:column-parallel]


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Column-parallel matrices of the same input stacked into one (the MLP's gate and up): this rank
    holds its share of each, [gate rows; up rows], and computes them with one multiply."""

    def __init__(self, in_features: int, out_features: list[int], bias: bool):
        super().__init__(in_features, sum(out_features), bias, [even_part(n) for n in out_features])


# --8<-- [start:qkv-parallel]
class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v in one column-parallel layer, split by heads: this rank holds ``num_heads`` query heads
    and ``num_kv_heads`` KV heads (the local counts; ``kv_head_shard`` says which KV heads).

    The local layout is [q of my heads; k of my KV heads; v of my KV heads], so that the attention
    block splits its output exactly as it would without tensor parallelism.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool):
        tp = tp_info()
        heads = divide(num_heads, tp.size, "attention heads")
        kv_first, kv_heads = kv_head_shard(num_kv_heads, tp.rank, tp.size)
        q = Part(heads * head_dim, tp.rank * heads * head_dim, num_heads * head_dim)
        kv = Part(kv_heads * head_dim, kv_first * head_dim, num_kv_heads * head_dim)
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias, [q, kv, kv])
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.split_sizes = [q.rows, kv.rows, kv.rows]
# --8<-- [end:qkv-parallel]


# --8<-- [start:row-parallel]
class RowParallelLinear(nn.Module):
    """``x W^T + b`` with the input columns of ``W`` split across ranks: ``x`` is this rank's slice of the
    input features (what a column-parallel layer left it), and the partial products are summed."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        tp = tp_info()
        self.rank, columns = tp.rank, divide(in_features, tp.size, "input features")
        self.start, self.in_features = tp.rank * columns, in_features
        self.weight = nn.Parameter(torch.empty(out_features, columns))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None  # whole, on every rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # --8<-- [start:ex-row-parallel]
        # Each rank's product is a partial sum of y. The bias belongs to y, not to each part: rank 0
        # alone adds it, so that the all-reduce adds it once.
        bias = self.bias if self.rank == 0 else None
        return all_reduce(linear(x, self.weight, bias))
        # --8<-- [end:ex-row-parallel]

    def shard(self, name: str = "weight") -> Shard:
        if name == "bias":
            return whole(self.bias)
        return Shard(self.weight.data, (self.weight.shape[0], self.in_features), dim=1, start=self.start)
# --8<-- [end:row-parallel]
