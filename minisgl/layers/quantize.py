"""Int8 weights: every weight matrix stored as int8, one scale per output row (introduced in chapter 06).

Decoding one request multiplies a single row by every weight matrix, so a decode step's time is mostly
the time it takes to read the weights from memory: 270 MB of bfloat16 for the default model, every
token. Storing them as int8 halves the bytes.

**How the scale is chosen.** Each output row ``w`` of a weight matrix gets its own scale
``s = max |w| / 127``, and is stored as ``q = round(w / s)``, integers in [-127, 127]: symmetric (zero
stays exactly zero, no offset to store) and per output channel (a row of small numbers is not crushed
by another row's large ones). The product is ``x q^T`` with each output feature times its row's ``s``
afterwards: the scales come out of the sum, so the integer matrix is multiplied as is.

**Where the error goes.** Rounding moves each weight by at most ``s / 2``, so the error of an output
feature grows with its row's largest weight, never with another row's. ``benchmarks/int8_accuracy.py``
measures what it does to the whole model: perplexity and greedy agreement, in chapter 06's tables.

Two schemes, named as SGLang names them, both measured in chapter 06 (``benchmarks/int8_weights.py``,
``benchmarks/int8_accuracy.py``):

- ``int8wo`` (weight only; SGLang: ``--torchao-config int8wo``): the activations stay as they are; the
  product reads the int8 weight and scales it (``torch.ops.aten._weight_int8pack_mm``). Perplexity within
  1% of bfloat16's. Its kernel is fast for one or two rows and slow for more (2.7x slower than bfloat16 at
  32 rows: its time grows almost in step with the rows), so on a CPU the bfloat16 weight is kept too,
  prepacked, for steps of more than ``WEIGHT_ONLY_MAX_ROWS`` rows: batches and prefills. One stream gets
  fewer bytes per token; the memory grows by the int8 copy.
- ``w8a8_int8`` (SGLang's ``--quantization w8a8_int8``): the activations are quantized too, at run time,
  and the product is int8 x int8 summed in int32 (fbgemm's dynamic linear, which picks one scale for the
  whole activation). The fastest at every batch size measured, and not accurate enough on this model:
  the input of each MLP's down projection has a few channels hundreds of times larger than the rest, and
  one scale for them all rounds the others away (perplexity 1.56 times float32's). The float weight is dropped.

On a GPU both schemes keep only the int8 weight and multiply ``x`` by it converted back on the fly: the
memory is halved; the course's GPU fast path stays the CUDA graphs of chapter 06.

Under tensor parallelism each rank quantizes its own shard: a row-parallel layer's scales are then
those of its columns, which only makes each scale fit its numbers more closely.
"""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .linear import embedding_only_looked_up

SCHEMES = ("int8wo", "w8a8_int8")
# Measured (``benchmarks/int8_weights.py``): a decode step's products with the weight-only kernel beat the
# prepacked bfloat16 ones at 1 and 2 rows and lose from 4 rows on.
WEIGHT_ONLY_MAX_ROWS = 2


# --8<-- [start:quantize]
def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (int8 [out, in], float32 scales [out]), with ``weight ~ q * scale[:, None]``."""
    # --8<-- [start:ex-per-channel]
    w = weight.float()
    # An all-zero row (the padding of a vocabulary split over ranks) gets a tiny scale, not a division by 0.
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale
    # --8<-- [end:ex-per-channel]


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)
# --8<-- [end:quantize]


# --8<-- [start:int8-weight]
class Int8Weight:
    """A weight matrix in int8, and the product ``linear`` calls instead of the float one for inputs of up
    to ``max_rows`` rows (more: the float weight, which is then kept)."""

    def __init__(self, weight: torch.Tensor, scheme: str):
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization {scheme!r}: use one of {', '.join(SCHEMES)}")
        self.q, self.scale = quantize_per_channel(weight)
        self.scale_as_input = self.scale.to(weight.dtype)  # the weight-only kernel wants the activations' dtype
        self.on_cpu = weight.device.type == "cpu"
        self.max_rows = WEIGHT_ONLY_MAX_ROWS if self.on_cpu and scheme == "int8wo" else None  # None: all
        self.fbgemm = None
        if self.on_cpu and scheme == "w8a8_int8":
            # fbgemm's own layout of the same integers, made from a quantized tensor (integers, scales, zero
            # points 0). torch 2.13 calls such tensors deprecated (their home is moving to torchao), and runs
            # them.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                qweight = torch._make_per_channel_quantized_tensor(
                    self.q, self.scale.double(), torch.zeros_like(self.scale, dtype=torch.long), 0)
            self.fbgemm = torch.ops.quantized.linear_prepack(qweight, None)
            # Without VNNI instructions, fbgemm's int8 kernels add pairs of products in 16 bits, which 8-bit
            # activations can overflow: quantize them to 7 bits there, as PyTorch's own dynamic Linear does.
            self.reduce_range = not torch.cpu._is_vnni_supported()

    def takes(self, x: torch.Tensor) -> bool:
        return self.max_rows is None or x.shape[0] <= self.max_rows

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.fbgemm is not None:  # activations quantized per call, int8 x int8 summed in int32, scaled back
            out = torch.ops.quantized.linear_dynamic(x.float(), self.fbgemm, self.reduce_range).to(x.dtype)
        elif self.on_cpu:
            out = torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale_as_input)
        else:  # converted back on the fly: half the memory, the GPU's own product, scaled in float32
            out = (F.linear(x, self.q.to(x.dtype)) * self.scale).to(x.dtype)
        return out if bias is None else out + bias
# --8<-- [end:int8-weight]


def quantize_model(model: nn.Module, scheme: str) -> int:
    """Give every linear layer's weight, and the LM head's, an ``Int8Weight`` (``weight.int8``); returns how
    many. Where the int8 product takes every input the float weight is dropped (a shape on the meta device
    is left in its place, so that a stray use fails loudly), except a tied embedding's, which still looks
    tokens up."""
    embed, lookup_only = getattr(model, "embed", None), embedding_only_looked_up(model)
    quantized = 0
    for module in list(model.modules()):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or isinstance(module, nn.Embedding):
            continue
        if module is lookup_only:  # no product to quantize
            continue
        int8 = Int8Weight(weight.detach(), scheme)
        if module is not embed and int8.max_rows is None:  # a tied embedding keeps its weight for lookups
            module.weight = nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device="meta"),
                                         requires_grad=False)
        module.weight.int8 = int8
        quantized += 1
    return quantized
