"""Int4 weights (``layers/quantize.py``, ``--quantization int4wo-32``): one scale and minimum per group of 32 weights
along a row, torch's int4 kernel on a CPU, the LM head in int8.

- ``quantize_groups``: each group's smallest weight becomes 0 and its largest 15, no weight moves by more than
  half its group's scale, and a group's scale is its own (a large group beside small ones leaves them precise).
- ``Int4Weight``'s product on random layers: exactly the weights the kernel was given (its scales and zeros in the
  activations' dtype), up to float rounding; those stay within half a scale of the float weights; the GPU's
  formula, run here on the CPU; shapes the kernel cannot take are refused; ``linear`` uses the int4 product for
  up to ``INT4_MAX_ROWS`` rows and the float weight, bit for bit, for more.
- ``quantize_model(model, "int4wo-32")`` on a tiny model: int4 in every linear layer, int8 in the LM head (tied or
  not), every float weight kept for the larger inputs; an ``Engine``'s logits stay close to float32's.
- Tensor parallelism: at TP 2 each rank's int4 weights are the quantization of its own shard (a shard whose
  in-features are not whole groups stays int8), and the logits stay close to TP 1's.
- The default model with ``LLM(quantization="int4wo-32")``: its greedy tokens start as transformers' float32 ones.
"""

import pytest
import torch
import torch.nn.functional as F
from test_int8 import (
    BF16_PACKS,
    DTYPES,
    LINEARS,
    ROUNDING,
    assert_within,
    common_prefix,
    engine_logits,
    one_thread,  # noqa: F401 (the module's fixture: one thread, as in test_int8.py)
    oracle_prompts,
    quantized_names,
    transformers_greedy,
)

from minisgl.core import SamplingParams
from minisgl.layers.linear import linear, prepack_for_cpu, takes_every_input
from minisgl.layers.quantize import (
    INT4_GROUP,
    INT4_MAX_ROWS,
    SCHEMES,
    Int4Weight,
    Int8Weight,
    dequantize_groups,
    quantize_groups,
    quantize_model,
)
from minisgl.models import load_model
from ranks import run_ranks

OUT, IN = 48, 128  # four groups of 32 along each row; rows in blocks of 16, as the kernel needs
ROWS = pytest.mark.parametrize("rows", [1, 3, INT4_MAX_ROWS + 1])
UNIT_ROUNDOFF = {torch.float32: 2**-24, torch.bfloat16: 2**-8}


def random_layer(rows: int, dtype: torch.dtype, seed: int = 0):
    """(weight [OUT, IN], bias [OUT], x [rows, IN]) in ``dtype``; rows a thousand times apart in size, and within
    each row the groups a hundred times apart, so that a scale shared between rows or groups would show."""
    generator = torch.Generator().manual_seed(seed)
    groups = torch.logspace(0, 2, IN // INT4_GROUP).repeat_interleave(INT4_GROUP)
    weight = torch.randn(OUT, IN, generator=generator) * torch.logspace(-2, 1, OUT)[:, None] * groups
    bias = torch.randn(OUT, generator=generator)
    x = torch.randn(rows, IN, generator=generator)
    return weight.to(dtype), bias.to(dtype), x.to(dtype)


# ------------------------------------------------------------------------------ quantize_groups


def test_each_group_spans_its_own_sixteen_levels():
    weight, _, _ = random_layer(1, torch.float32)
    weight[5, 32:64] = 0.25  # a constant group: represented exactly, with no division by zero
    q, scale, minimum = quantize_groups(weight)
    groups = IN // INT4_GROUP
    assert q.dtype == torch.uint8 and q.shape == weight.shape
    assert scale.shape == minimum.shape == (OUT, groups) and scale.dtype == minimum.dtype == torch.float32
    w = weight.view(OUT, groups, INT4_GROUP)
    qg = q.view(OUT, groups, INT4_GROUP).long()
    assert torch.equal(minimum, w.amin(dim=2)), "a group's minimum is its smallest weight"
    varying = w.amax(dim=2) > w.amin(dim=2)
    # The smallest weight of a group becomes 0, the largest 15: the group's whole range, no level wasted.
    assert (qg.amin(dim=2) == 0).all() and (qg.amax(dim=2)[varying] == 15).all()
    back = dequantize_groups(q, scale, minimum)
    error = (back - weight).abs().view(OUT, groups, INT4_GROUP).amax(dim=2)
    assert (error <= scale / 2 * (1 + 1e-5) + 1e-12).all(), "a weight moved by more than half its group's scale"
    assert torch.equal(back[5, 32:64], weight[5, 32:64]), "a constant group is not exact"
    # Groups a hundred times apart in one row: the small ones get small scales (one scale per row would give them
    # the large group's, and round them all to the same few levels).
    for row in range(OUT):
        sizes = w[row].abs().amax(dim=1)
        assert scale[row, sizes.argmin()] < scale[row, sizes.argmax()] / 10


@pytest.mark.parametrize("shape", [(40, 128), (48, 100)], ids=["rows-not-of-16", "columns-not-of-32"])
def test_a_shape_the_kernel_cannot_take_is_refused(shape):
    weight = torch.randn(shape)
    assert not Int4Weight.fits(weight)
    with pytest.raises(ValueError, match="multiple of"):
        Int4Weight(weight)


# ------------------------------------------------------------------------------ Int4Weight's product


def kernel_weights(int4: Int4Weight, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In float64: the weights the CPU kernel multiplies by, (q - 8) * scale + zero with its own (rounded) scales
    and zeros, and the sizes of those two terms (what float rounding errors are relative to)."""
    scale, zero = (int4.scales_and_zeros[..., i].double().T.repeat_interleave(INT4_GROUP, dim=1) for i in (0, 1))
    centred = q.double() - 8
    return centred * scale + zero, centred.abs() * scale.abs() + zero.abs()


@DTYPES
@ROWS
def test_the_product_multiplies_by_the_kernels_weights_which_stay_within_half_a_scale(rows, dtype):
    weight, bias, x = random_layer(rows, dtype, seed=rows)
    int4 = Int4Weight(weight)
    got = int4(x, bias)
    assert got.dtype == dtype and got.shape == (rows, OUT)
    q, scale, _ = quantize_groups(weight)
    used, sizes = kernel_weights(int4, q)
    xd, bd = x.double(), bias.double()
    terms = xd.abs() @ sizes.T + bd.abs()
    assert_within(got, xd @ used.T + bd, ROUNDING[dtype] * terms, f"int4 {rows} rows {dtype}: x w^T + bias")
    # The kernel's weights are the float ones moved by at most half their group's scale, and by the rounding of
    # its scale and zero to the activations' dtype (bfloat16 keeps 8 significant bits: 2^-8 of their sizes).
    moved = scale.double().repeat_interleave(INT4_GROUP, dim=1) / 2 + UNIT_ROUNDOFF[dtype] * sizes
    assert ((used - weight.double()).abs() <= moved).all(), f"{dtype}: a kernel weight moved by more than half a scale"


@DTYPES
@ROWS
def test_the_gpu_formula_multiplies_by_the_dequantized_weights(rows, dtype):
    weight, bias, x = random_layer(rows, dtype, seed=rows)
    int4 = Int4Weight(weight)
    # What an Int4Weight made on a GPU keeps and does: the integers, scales and minimums, converted back to x's
    # dtype for F.linear. Run here on the CPU by giving it those.
    int4.on_cpu = False
    int4.q, int4.scale, int4.minimum = quantize_groups(weight)
    got = int4(x, bias)
    assert got.dtype == dtype and got.shape == (rows, OUT)
    deq = dequantize_groups(int4.q, int4.scale, int4.minimum).double()
    xd, bd = x.double(), bias.double()
    bound = ROUNDING[dtype] * (xd.abs() @ deq.abs().T + bd.abs()) + 2**-9 * (xd.abs() @ deq.abs().T)
    assert_within(got, xd @ deq.T + bd, bound, f"gpu formula {rows} rows {dtype}")


@ROWS
def test_linear_uses_the_int4_product_only_where_it_takes_the_input(rows):
    weight, bias, x = random_layer(rows, torch.bfloat16, seed=rows)
    float_product = F.linear(x, weight, bias)
    int4 = Int4Weight(weight)
    weight.quantized = int4
    assert not takes_every_input(int4), "on a CPU the float weight is kept for the larger inputs"
    if rows <= INT4_MAX_ROWS:
        got = linear(x, weight, bias)
        assert torch.equal(got, int4(x, bias)) and not torch.equal(got, float_product)
        return
    assert not int4.takes(x)
    assert torch.equal(linear(x, weight, bias), float_product), "more rows: the float weight's product, exactly"


# ------------------------------------------------------------------------------ a whole model

@pytest.mark.parametrize("tied", [False, True], ids=["lm-head", "tied-embedding"])
def test_quantize_model_gives_the_layers_int4_and_the_lm_head_int8(tiny_llama, tied):
    model = load_model(tiny_llama, torch.bfloat16)
    if tied:
        model.lm_head = None  # the embedding scores the vocabulary too, as SmolLM2's does
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    head = "embed" if tied else "lm_head"
    assert quantize_model(model, "int4wo-32") == 2 * 4 + 1
    layers = {f"layers.{i}.{linear_name}" for i in range(2) for linear_name in LINEARS}
    assert quantized_names(model) == layers | {head}
    for name in layers:
        weight = model.get_submodule(name).weight
        assert isinstance(weight.quantized, Int4Weight), f"{name}: {type(weight.quantized).__name__}, not int4"
        assert torch.equal(weight, before[f"{name}.weight"]), f"{name}: the float weight is kept for larger inputs"
        own = Int4Weight(before[f"{name}.weight"])
        assert torch.equal(weight.quantized.packed, own.packed), f"{name}: not its own weight's int4"
    quantized_head = model.get_submodule(head).weight.quantized
    assert isinstance(quantized_head, Int8Weight), "the LM head stays int8 (measured: 4 bits there cost the most)"
    assert torch.equal(model.get_submodule(head).weight, before[f"{head}.weight"])
    assert prepack_for_cpu(model) == (2 * 4 + 1 if BF16_PACKS else 0)


def test_quantize_model_refuses_an_unknown_scheme_with_the_choices(tiny_llama):
    model = load_model(tiny_llama, torch.bfloat16)
    with pytest.raises(ValueError) as refused:
        quantize_model(model, "int4wo-128")
    assert all(scheme in str(refused.value) for scheme in SCHEMES), str(refused.value)


def test_a_forward_pass_with_int4_weights_stays_close_to_float32(tiny_llama):
    # Two prompts of 2 tokens, then steps of 2 rows: int4 in every linear layer, int8 in the LM head.
    prompts, steps = [[5, 6], [7, 8]], 3
    _, reference = engine_logits(tiny_llama, "float32", "", prompts, steps)
    _, int8 = engine_logits(tiny_llama, "bfloat16", "int8wo", prompts, steps)
    _, int4 = engine_logits(tiny_llama, "bfloat16", "int4wo-32", prompts, steps)
    # The largest difference from float32, in units of the float32 logits' standard deviation (0.70). Measured:
    # 0.57 with int4 (int8wo: 0.063): sixteen levels for random weights, in every matrix; the bound is about
    # twice the measured value (a zero off by 8 scales, say, puts the logits several deviations away).
    error = ((int4 - reference).abs().max() / reference.std()).item()
    int8_error = ((int8 - reference).abs().max() / reference.std()).item()
    assert error <= 1.0, f"int4 logits off by {error:.3f} standard deviations of float32's (measured: 0.57)"
    assert error > int8_error, f"int4 ({error:.3f}) no further from float32 than int8 ({int8_error:.3f}): int4 unused?"


# ------------------------------------------------------------------------------ tensor parallelism


def int4_in_a_rank(tiny_llama, prompts: list[list[int]], steps: int):
    """In one rank: ``engine_logits`` with int4wo-32 in float32, and for every quantized layer its kind, and whether
    it is the quantization of this rank's float shard (as the rank loads it without quantization)."""
    engine, logits = engine_logits(tiny_llama, "float32", "int4wo-32", prompts, steps)
    floats = load_model(tiny_llama, torch.float32)
    found = {}
    for name in quantized_names(engine.model):
        quantized, weight = engine.model.get_submodule(name).weight.quantized, floats.get_submodule(name).weight
        if isinstance(quantized, Int4Weight):
            own = torch.equal(quantized.packed, Int4Weight(weight.detach()).packed)
        else:
            own = torch.equal(quantized.q, Int8Weight(weight.detach(), "int8wo").q)
        found[name] = (type(quantized).__name__, tuple(weight.shape), own)
    return found, logits


@pytest.mark.ranks(2)
def test_each_rank_quantizes_its_own_shard_to_int4(tiny_llama):
    """At TP 2 each rank's int4 weights are ``Int4Weight`` of its own float shard. The tiny model's down projection
    has 96 in-features, 48 a rank: not whole groups of 32, so there it stays int8 (as it does at TP 1 for no
    layer). The logits agree between the ranks and stay near TP 1's int4 ones."""
    prompts, steps = [[5, 6], [7, 8]], 3
    _, reference = engine_logits(tiny_llama, "float32", "", prompts, steps)
    _, tp1 = engine_logits(tiny_llama, "float32", "int4wo-32", prompts, steps)
    ranks = run_ranks(2, int4_in_a_rank, tiny_llama, prompts, steps)
    for r, (found, _) in enumerate(ranks):
        for name, (kind, shape, own) in found.items():
            expected = "Int8Weight" if name == "lm_head" or name.endswith("mlp.down") else "Int4Weight"
            assert kind == expected, f"rank {r}, {name} {shape}: {kind}, expected {expected}"
            assert own, f"rank {r}, {name}: not the quantization of the rank's own float shard"
    logits = ranks[0][1]
    assert torch.equal(ranks[1][1], logits), "rank 1's logits differ from rank 0's"
    std = reference.std().item()
    # Measured: TP 2's int4 logits are 0.19 standard deviations off TP 1's (their down projections differ: int8
    # against int4), and 0.61 off float32's, as TP 1's are; the bound is about twice the first. Without quantized
    # products TP 2 would be within float rounding of float32 (chapter 04's test_tensor_parallel.py).
    from_tp1 = ((logits - tp1).abs().max() / std).item()
    from_float = ((logits - reference).abs().max() / std).item()
    assert from_tp1 <= 0.4, f"TP 2's int4 logits off TP 1's by {from_tp1:.3f} standard deviations (measured: 0.19)"
    assert from_float >= 0.1, f"TP 2's int4 logits off float32's by only {from_float:.2g} (measured: 0.61): unused?"


# ------------------------------------------------------------------------------ the default model

NEW_TOKENS = 24
# How many leading greedy tokens of NEW_TOKENS int4wo-32 (bfloat16 activations) shares with transformers' float32,
# measured on this course's CPU (x86-64 with AVX-512): every one, for all three prompts. The default model was
# dequantized from a Q4_1 GGUF file: groups of 32 find its layers' own sixteen levels, so int4 there is as exact as
# the bfloat16 weights it starts from (chapter 06, "Four bits").
AGREED = {"chat": 24, "code": 24, "long": 24}


@pytest.mark.real_model
def test_int4_weights_keep_the_default_models_first_greedy_tokens(model_path, tokenizer):
    from minisgl import LLM

    prompts = oracle_prompts(tokenizer)
    llm = LLM(model_path, dtype="bfloat16", quantization="int4wo-32", max_running_requests=4)
    model = llm.engine.model
    kinds = {name: type(model.get_submodule(name).weight.quantized).__name__ for name in quantized_names(model)}
    assert kinds.pop("embed") == "Int8Weight", "the tied embedding scores the vocabulary in int8"
    assert set(kinds.values()) == {"Int4Weight"} and len(kinds) == 4 * model.config.num_layers
    ours = {uid: llm.generate([prompt], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))[0].token_ids
            for uid, prompt in prompts.items()}
    del llm, model

    for uid, theirs in transformers_greedy(model_path, prompts, NEW_TOKENS).items():
        agreed = common_prefix(ours[uid], theirs)
        assert agreed >= AGREED[uid], (
            f"{uid}: int4wo-32 agreed with transformers' float32 for {agreed} tokens, measured {AGREED[uid]}; "
            f"ours {ours[uid]}, transformers {theirs}"
        )
