"""Quantized weights: int8 with one scale per output row, or int4 with one scale per group of 32 (introduced in
chapter 06).

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
  one scale for them all rounds the others away (perplexity 1.55 times float32's). The float weight is dropped.

On a GPU every scheme keeps only the quantized weight (int4's one integer a byte) and multiplies ``x`` by it
converted back on the fly: less memory, no faster; the course's GPU fast path stays the CUDA graphs of
chapter 06.

**Int4, one scale per group.** ``int4wo-32`` (SGLang: ``--torchao-config int4wo-32``) halves the bytes again:
sixteen levels are too few for one scale per row, so every run of 32 weights along a row gets its own, and
an offset too (its minimum: ``w ~ q * scale + minimum``, ``q`` in [0, 15]), since with so few levels a
symmetric grid wastes the ones its group does not reach. torch's CPU kernel
(``torch.ops.aten._weight_int4pack_mm_for_cpu``) reads two integers a byte and a (scale, zero) pair per
group. On the default model it is lossless in the layers (the checkpoint was dequantized from a GGUF file
whose layers were int4 in blocks of 32: groups of 32 find the same sixteen levels), and costs the LM head
(8 bits in that file) 5% of perplexity (``benchmarks/int8_accuracy.py``): the LM head stays ``int8wo``; so
does a matrix whose shape the kernel cannot take (in-features not a multiple of 32, out-features not of 16).
Like ``int8wo``, the float weight is kept on a CPU for steps of more than ``INT4_MAX_ROWS`` rows.

Under tensor parallelism each rank quantizes its own shard: a row-parallel layer's scales are then
those of its columns, which only makes each scale fit its numbers more closely.
"""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .linear import embedding_only_looked_up, lm_head_of

SCHEMES = ("int8wo", "w8a8_int8", "int4wo-32")
INT8_SCHEMES = SCHEMES[:2]
# Measured (``benchmarks/int8_weights.py``): a decode step's products with the int8 weight-only kernel beat the
# prepacked bfloat16 ones at 1 and 2 rows and lose from 4 rows on; the int4 kernel's win up to 4 rows and tie
# at 8 (ahead in one run, behind in another).
WEIGHT_ONLY_MAX_ROWS = 2
INT4_MAX_ROWS = 4
INT4_GROUP = 32


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
        if scheme not in INT8_SCHEMES:
            raise ValueError(f"unknown int8 scheme {scheme!r}: use one of {', '.join(INT8_SCHEMES)}")
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


# --8<-- [start:quantize-groups]
def quantize_groups(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, ...]:
    """weight [out, in] -> (integers [out, in] in [0, 15] as uint8, scales and minimums [out, in / group]),
    with ``weight ~ q * scale + minimum`` for each run of ``group`` weights along a row."""
    rows, columns = weight.shape
    w = weight.float().view(rows, columns // group, group)
    minimum, maximum = w.amin(dim=2), w.amax(dim=2)
    # Sixteen levels from the group's smallest weight to its largest; a constant group gets a tiny scale
    # (every q is 0, and the minimum is the weight), not a division by 0.
    scale = ((maximum - minimum) / 15).clamp(min=1e-12)
    q = torch.round((w - minimum[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return q.view(rows, columns), scale, minimum


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, columns = q.shape
    groups = q.view(rows, scale.shape[1], -1).float()
    return (groups * scale[..., None] + minimum[..., None]).view(rows, columns).to(dtype)
# --8<-- [end:quantize-groups]


# --8<-- [start:int4-weight]
class Int4Weight:
    """A weight matrix in int4, one scale and minimum per group of ``group`` weights along a row, and its
    product for inputs of up to ``max_rows`` rows (on a CPU; more: the float weight, which is then kept)."""

    def __init__(self, weight: torch.Tensor, group: int = INT4_GROUP):
        if not self.fits(weight, group):
            raise ValueError(f"int4 needs in-features a multiple of {group} and out-features a multiple of 16, "
                             f"not {tuple(weight.shape)}")
        q, scale, minimum = quantize_groups(weight, group)
        self.group = group
        self.on_cpu = weight.device.type == "cpu"
        self.max_rows = INT4_MAX_ROWS if self.on_cpu else None
        if self.on_cpu:
            # torch's kernel wants two integers a byte in its own order, and for each group a pair (scale, zero)
            # in the activations' dtype, [groups, out, 2], read as w = (q - 8) * scale + zero: our minimum is
            # then zero - 8 * scale. Only these are kept: 4 bits a weight, and 32 for each group's pair in
            # bfloat16, 5 bits a weight in all.
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            zero = minimum + 8 * scale
            pairs = torch.stack([scale, zero], dim=2)  # [out, groups, 2]
            self.scales_and_zeros = pairs.transpose(0, 1).contiguous().to(weight.dtype)
        else:
            self.q, self.scale, self.minimum = q, scale, minimum

    @staticmethod
    def fits(weight: torch.Tensor, group: int = INT4_GROUP) -> bool:
        """Whether the kernel takes this shape: whole groups along a row, and rows in blocks of 16."""
        return weight.shape[1] % group == 0 and weight.shape[0] % 16 == 0

    def takes(self, x: torch.Tensor) -> bool:
        return self.max_rows is None or x.shape[0] <= self.max_rows

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.on_cpu:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_and_zeros)
        else:  # converted back on the fly
            out = F.linear(x, dequantize_groups(self.q, self.scale, self.minimum, x.dtype))
        return out if bias is None else out + bias
# --8<-- [end:int4-weight]


# --8<-- [start:quantize-model]
def quantize_model(model: nn.Module, scheme: str) -> int:
    """Give every linear layer's weight, and the LM head's, a quantized product (``weight.quantized``: an
    ``Int8Weight``, or under ``int4wo-32`` an ``Int4Weight``, but for the LM head and the shapes its kernel
    cannot take); returns how many. Where that product takes every input the float weight is dropped (a shape on
    the meta device is left in its place, so that a stray use fails loudly), except a tied embedding's, which
    still looks tokens up."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}: use one of {', '.join(SCHEMES)}")
    embed, lookup_only, head = getattr(model, "embed", None), embedding_only_looked_up(model), lm_head_of(model)
    quantized = 0
    for module in list(model.modules()):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or isinstance(module, nn.Embedding):
            continue
        if module is lookup_only:  # no product to quantize
            continue
        if scheme == "int4wo-32":  # measured: 4 bits in the LM head cost the model's perplexity the most
            product = Int4Weight(weight.detach()) if module is not head and Int4Weight.fits(weight) \
                else Int8Weight(weight.detach(), "int8wo")
        else:
            product = Int8Weight(weight.detach(), scheme)
        if module is not embed and product.max_rows is None:  # a tied embedding keeps its weight for lookups
            module.weight = nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device="meta"),
                                         requires_grad=False)
        module.weight.quantized = product
        quantized += 1
    return quantized
# --8<-- [end:quantize-model]
