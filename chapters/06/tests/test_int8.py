"""Int8 weights (``layers/quantize.py``, ``--quantization``): one scale per output row, and the products that use
them.

- The exercise ``per-channel``: ``quantize_per_channel`` gives each row the scale max |w| / 127, its largest weight
  becomes exactly +-127, and no weight moves by more than half its row's scale.
- ``Int8Weight``'s products, on random layers: ``int8wo`` multiplies by exactly the dequantized weights (up to
  float rounding), ``w8a8_int8`` stays within the error that rounding both the weights and the activations
  allows; the GPU's formula, run here on the CPU; inputs of more rows than the weight-only kernel is fast for
  go to the float weight, bit for bit.
- ``quantize_model`` on a tiny model: which weights get an int8 copy, which float weights are dropped, what is
  left to prepack; a whole forward pass through an ``Engine`` with int8 weights stays close to float32.
- Tensor parallelism: at TP 2 each rank's int8 weights are the quantization of its own shard, and the logits
  stay within the quantization error of TP 1's.
- The default model with ``LLM(quantization="int8wo")``: its greedy tokens start as transformers' float32 ones.
- The server flag ``--quantization``, whose choices are the schemes the module knows.
"""

import argparse

import pytest
import torch
import torch.nn.functional as F

from minisgl.core import Batch, Request, SamplingParams
from minisgl.engine import Engine
from minisgl.layers.linear import linear, prepack_for_cpu, takes_every_input
from minisgl.layers.quantize import (
    INT8_SCHEMES,
    SCHEMES,
    WEIGHT_ONLY_MAX_ROWS,
    Int8Weight,
    dequantize,
    quantize_model,
    quantize_per_channel,
)
from minisgl.models import load_model
from ranks import run_ranks

BF16_PACKS = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread, as in test_paged_engine.py: on a busy machine two threads of one process wait for each other
    more than they work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ the exercise


@pytest.mark.exercise("per-channel", focused=True)
def test_each_row_gets_its_own_scale_and_its_largest_weight_becomes_127():
    generator = torch.Generator().manual_seed(0)
    # Rows two million times apart in size, and an all-zero row (a vocabulary's padding): one scale for the whole
    # matrix would round the small rows to zero.
    magnitudes = torch.tensor([1e-3, 0.05, 1.0, 40.0, 2000.0, 0.0])
    weight = torch.randn(len(magnitudes), 33, generator=generator) * magnitudes[:, None]
    weight[1, 7] = -1.5 * weight[1].abs().max()  # a row whose largest |weight| is negative: it becomes -127
    zero = len(magnitudes) - 1

    q, scale = quantize_per_channel(weight)

    assert q.dtype == torch.int8, f"the integers are {q.dtype}, expected torch.int8 (.to(torch.int8) after rounding)"
    assert scale.dtype == torch.float32, f"the scales are {scale.dtype}, expected torch.float32"
    assert q.shape == weight.shape, (
        f"the integers have shape {tuple(q.shape)}, expected the weight's {tuple(weight.shape)}"
    )
    assert scale.shape == (len(magnitudes),), (
        f"the scales have shape {tuple(scale.shape)}, expected one per output row: ({len(magnitudes)},)"
    )
    assert -127 <= q.min() and q.max() <= 127, (
        f"integers from {q.min()} to {q.max()}: symmetric quantization uses [-127, 127] (never -128)"
    )
    row_max = weight.abs().amax(dim=1)
    for row in range(zero):
        top = weight[row].abs().argmax()
        expected_top = 127 if weight[row, top] > 0 else -127
        assert q[row, top] == expected_top, (
            f"row {row}: its largest |weight| {weight[row, top]:.3g} became {q[row, top]}, expected {expected_top}. "
            "Is the scale its own row's max |w| / 127 (amax over dim=1), not the whole matrix's?"
        )
        assert torch.allclose(scale[row], row_max[row] / 127, rtol=1e-6, atol=0), (
            f"row {row}: scale {scale[row]:.6g}, expected max |w| / 127 = {row_max[row] / 127:.6g}"
        )
    assert torch.isfinite(scale[zero]) and 0 < scale[zero] <= 1e-6, (
        f"the all-zero row's scale is {scale[zero]}: expected a tiny positive one (clamp max |w| at, say, 1e-12 "
        "before dividing by 127), so that w / scale is 0, not 0 / 0"
    )
    assert (q[zero] == 0).all(), f"the all-zero row became {q[zero].tolist()}, expected zeros"

    error = (dequantize(q, scale) - weight).abs().amax(dim=1)
    for row in range(len(magnitudes)):
        # Rounding to the nearest integer moves each weight by at most half a step (float rounding: 1e-6 of it).
        assert error[row] <= scale[row] / 2 * (1 + 1e-6), (
            f"row {row}: a weight moved by {error[row]:.3g} when dequantized, more than half its scale "
            f"{scale[row] / 2:.3g}. Round (torch.round) w / scale, do not truncate"
        )


@pytest.mark.exercise("per-channel")
def test_a_bfloat16_weight_is_quantized_in_float32():
    """The model's weights are bfloat16; their scales must not be: a bfloat16 scale keeps 8 bits, and each row's
    products would be off by up to 0.4% before any rounding of the weights."""
    generator = torch.Generator().manual_seed(1)
    weight = (torch.randn(16, 40, generator=generator) * torch.logspace(-3, 2, 16)[:, None]).to(torch.bfloat16)
    q, scale = quantize_per_channel(weight)
    q_float, scale_float = quantize_per_channel(weight.float())  # the same numbers, already float32
    assert scale.dtype == torch.float32, f"a bfloat16 weight's scales are {scale.dtype}: compute them in float32"
    assert torch.equal(scale, scale_float) and torch.equal(q, q_float), (
        "a bfloat16 weight quantizes differently from its float32 copy: convert it with .float() first"
    )


# ------------------------------------------------------------------------------ Int8Weight's products

OUT, IN = 48, 64
# How far float rounding may move a product, relative to the sum of its terms' sizes (|x| |w| summed, plus
# |bias|): float32 accumulates 64 terms (64 x 2^-24, below 1e-5); bfloat16 rounds the scale, the product and
# the sum with the bias (and on the GPU path the unscaled product), 2^-9 each, at most 4 of them: 2^-7.
ROUNDING = {torch.float32: 1e-5, torch.bfloat16: 2**-7}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
ROWS = pytest.mark.parametrize("rows", [1, 2, 9])


def random_layer(rows: int, dtype: torch.dtype, seed: int = 0):
    """(weight [OUT, IN], bias [OUT], x [rows, IN]) in ``dtype``; the weight's rows are a thousand times apart in
    size, as a real layer's can be, so that a scale shared between rows would show."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(OUT, IN, generator=generator) * torch.logspace(-2, 1, OUT)[:, None]
    bias = torch.randn(OUT, generator=generator)
    x = torch.randn(rows, IN, generator=generator)
    return weight.to(dtype), bias.to(dtype), x.to(dtype)


def products(x, weight, bias, int8: Int8Weight):
    """In float64: the product with the dequantized weights, with the float weights, and the sums of the terms'
    sizes of each (what float rounding errors are relative to)."""
    xd, wd, bd = x.double(), weight.double(), bias.double()
    deq = dequantize(int8.q, int8.scale).double()
    return (xd @ deq.T + bd, xd @ wd.T + bd, xd.abs() @ deq.abs().T + bd.abs(), xd.abs() @ wd.abs().T + bd.abs())


def assert_within(got: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    error = (got.double() - expected).abs()
    worst = (error / bound).max().item()
    assert worst <= 1, f"{what}: off by up to {error.max():.3g}, {worst:.2f} times the bound"


@DTYPES
@ROWS
def test_weight_only_multiplies_by_the_dequantized_weights(rows, dtype):
    weight, bias, x = random_layer(rows, dtype, seed=rows)
    int8 = Int8Weight(weight, "int8wo")
    got = int8(x, bias)
    assert got.dtype == dtype and got.shape == (rows, OUT)
    exact, exact_float, terms, terms_float = products(x, weight, bias, int8)
    assert_within(got, exact, ROUNDING[dtype] * terms, f"int8wo {rows} rows {dtype}: x q^T scale + bias")
    # Each weight moved by at most half its row's scale: output j by at most sum |x| * scale_j / 2.
    moved = x.double().abs().sum(dim=1, keepdim=True) * int8.scale.double() / 2
    assert_within(got, exact_float, moved + ROUNDING[dtype] * terms_float, f"int8wo {rows} rows {dtype}: vs float")


@DTYPES
@ROWS
def test_w8a8_stays_within_the_error_of_rounding_weights_and_activations(rows, dtype):
    weight, bias, x = random_layer(rows, dtype, seed=rows)
    int8 = Int8Weight(weight, "w8a8_int8")
    got = int8(x, bias)
    assert got.dtype == dtype and got.shape == (rows, OUT)
    _, exact_float, _, terms_float = products(x, weight, bias, int8)
    # Output j is sum_k (x_k + dx_k)(w_jk + dw_jk), with |dw_jk| <= s_j / 2 (the weight's row scale) and
    # |dx_k| <= t / 2, t the activations' step: fbgemm maps the whole [min, max] of x (0 included) onto 256
    # levels, a step of at most 2 max|x| / 255 < max|x| / 127. The error is then at most
    # s_j / 2 sum|x| + t / 2 sum|w_j| + IN t s_j / 4, plus float rounding.
    xd, wd, s = x.double(), weight.double(), int8.scale.double()
    t = xd.abs().max() / 127
    bound = (s / 2 * xd.abs().sum(dim=1, keepdim=True) + t / 2 * wd.abs().sum(dim=1) + IN * t * s / 4
             + ROUNDING[dtype] * terms_float)
    assert_within(got, exact_float, bound, f"w8a8 {rows} rows {dtype}: vs float")


@pytest.mark.parametrize("scheme", INT8_SCHEMES)
@DTYPES
@ROWS
def test_the_gpu_formula_multiplies_by_the_dequantized_weights(scheme, rows, dtype):
    weight, bias, x = random_layer(rows, dtype, seed=rows)
    int8 = Int8Weight(weight, scheme)
    # What an Int8Weight made on a GPU does, for both schemes: F.linear by the integers converted to x's dtype,
    # times the scales. Run here on the CPU by taking away the CPU's kernels.
    int8.on_cpu, int8.fbgemm = False, None
    got = int8(x, bias)
    assert got.dtype == dtype and got.shape == (rows, OUT)
    exact, _, terms, _ = products(x, weight, bias, int8)
    assert_within(got, exact, ROUNDING[dtype] * terms, f"gpu formula {scheme} {rows} rows {dtype}")


@pytest.mark.parametrize("scheme", INT8_SCHEMES)
@ROWS
def test_linear_uses_the_int8_product_only_where_it_takes_the_input(scheme, rows):
    weight, bias, x = random_layer(rows, torch.bfloat16, seed=rows)
    float_product = F.linear(x, weight, bias)
    int8 = Int8Weight(weight, scheme)
    weight.quantized = int8
    # On a CPU the weight-only kernel is fast for up to WEIGHT_ONLY_MAX_ROWS rows only; w8a8 takes every input.
    takes = scheme == "w8a8_int8" or rows <= WEIGHT_ONLY_MAX_ROWS
    assert int8.takes(x) is takes
    assert takes_every_input(int8) is (scheme == "w8a8_int8")
    if takes:
        got = linear(x, weight, bias)
        assert torch.equal(got, int8(x, bias))
        assert not torch.equal(got, float_product)  # the int8 product: rounded weights give other numbers
        return
    assert torch.equal(linear(x, weight, bias), float_product), "more rows: the float weight's product, exactly"
    if BF16_PACKS:  # prepacked, as the engine leaves it: oneDNN's product, the same numbers (test_prepack.py)
        weight.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        assert torch.equal(linear(x, weight, bias), float_product)


def test_an_unknown_scheme_is_refused_with_the_choices():
    with pytest.raises(ValueError) as refused:
        Int8Weight(torch.ones(4, 4), "int4")
    assert all(scheme in str(refused.value) for scheme in INT8_SCHEMES), str(refused.value)


# ------------------------------------------------------------------------------ a whole model

LINEARS = ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")


def quantized_names(model) -> set[str]:
    return {name for name, module in model.named_modules() if hasattr(getattr(module, "weight", None), "quantized")}


@pytest.mark.parametrize("scheme", INT8_SCHEMES)
def test_quantize_model_gives_every_product_an_int8_weight(tiny_llama, scheme):
    model = load_model(tiny_llama, torch.bfloat16)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    # per layer qkv, o, gate_up and down; the LM head (the tiny model's embedding is not tied: it only looks up)
    assert quantize_model(model, scheme) == 2 * 4 + 1
    names = {f"layers.{i}.{linear_name}" for i in range(2) for linear_name in LINEARS} | {"lm_head"}
    assert quantized_names(model) == names
    for name in names:
        weight = model.get_submodule(name).weight
        original = before[f"{name}.weight"]
        assert torch.equal(weight.quantized.q, quantize_per_channel(original)[0]), f"{name}: not its own weight's int8"
        assert weight.shape == original.shape
        if scheme == "w8a8_int8":  # the int8 product takes every input: the float weight's memory is given back
            assert weight.is_meta, f"{name}: w8a8 keeps a float weight it never multiplies"
        else:  # kept for the inputs of more rows
            assert torch.equal(weight, original), f"{name}: int8wo changed the float weight"
    assert torch.equal(model.embed.weight, before["embed.weight"])
    # w8a8: nothing left to pack, its float weights are gone; int8wo: every float weight, as without int8
    assert prepack_for_cpu(model) == (2 * 4 + 1 if BF16_PACKS and scheme == "int8wo" else 0)
    with torch.inference_mode():  # a batch of 9 rows: w8a8 still never touches a dropped (meta) weight
        x = torch.randn(9, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        assert torch.isfinite(model.logits(model.layers[0].mlp(x))).all()


@pytest.mark.parametrize("scheme", INT8_SCHEMES)
def test_a_tied_embedding_keeps_its_float_weight_for_lookups(tiny_llama, scheme):
    model = load_model(tiny_llama, torch.bfloat16)
    model.lm_head = None  # now the embedding scores the vocabulary too, as SmolLM2's does
    embedding = model.embed.weight.detach().clone()
    assert quantize_model(model, scheme) == 2 * 4 + 1
    assert "embed" in quantized_names(model)
    assert torch.equal(model.embed.weight, embedding), "the embedding still looks tokens up: its float weight stays"
    # The embedding's int8 product takes every input under w8a8: its float weight is then never multiplied
    assert prepack_for_cpu(model) == (2 * 4 + 1 if BF16_PACKS and scheme == "int8wo" else 0)
    with torch.inference_mode():
        ids = torch.tensor([3, 1, 4])
        assert torch.equal(model.embed(ids), embedding[ids])
        assert torch.equal(model.logits(embedding[ids][:1]), model.embed.weight.quantized(embedding[ids][:1]).float())


def engine_logits(tiny_llama, dtype: str, quantization: str, prompts: list[list[int]], decode_steps: int):
    """Prefill each prompt alone, then decode all of them together ``decode_steps`` times, with fixed next tokens
    (not sampled: both engines must read the same tokens); every step's logits, stacked, in float32."""
    engine = Engine(tiny_llama, dtype, "cpu", 32 + 1, 4, 128, quantization=quantization)
    requests, first_page = [], 1
    for i, prompt in enumerate(prompts):
        pages = -(-(len(prompt) + decode_steps) // 4)
        requests.append(Request(f"r{i}", prompt, SamplingParams(), pages=list(range(first_page, first_page + pages))))
        first_page += pages
    logits = []
    for request in requests:
        logits.append(engine.forward(Batch([request], [len(request.prompt_ids)])))
        request.cached_len = len(request.prompt_ids)
    for step in range(decode_steps):
        for i, request in enumerate(requests):
            request.output_ids.append(10 + 7 * step + i)
        logits.append(engine.forward(Batch(requests, [1] * len(requests))))
        for request in requests:
            request.cached_len += 1
    return engine, torch.cat(logits)


def test_a_forward_pass_with_int8_weights_stays_close_to_float32(tiny_llama):
    # Two prompts of 2 tokens, then steps of 2 rows: every product within WEIGHT_ONLY_MAX_ROWS, so int8wo's
    # kernel runs in every linear layer and the LM head.
    prompts, steps = [[5, 6], [7, 8]], 3
    _, reference = engine_logits(tiny_llama, "float32", "", prompts, steps)
    _, bf16 = engine_logits(tiny_llama, "bfloat16", "", prompts, steps)
    engine, int8 = engine_logits(tiny_llama, "bfloat16", "int8wo", prompts, steps)
    assert len(quantized_names(engine.model)) == 2 * 4 + 1
    assert not torch.equal(int8, bf16), "the int8 weights were not used"
    # The largest difference from float32, in units of the float32 logits' standard deviation (0.70). Measured:
    # 0.063 with int8wo, 0.037 for bfloat16 alone; the bound is about three times the measured value.
    error = ((int8 - reference).abs().max() / reference.std()).item()
    assert error <= 0.2, f"int8wo logits off by {error:.3f} standard deviations of float32's (measured: 0.063)"


def test_w8a8_runs_a_long_prefill_without_its_dropped_weights(tiny_llama):
    """A prefill of 9 tokens: every product goes to the int8 weights (a dropped, meta weight would fail)."""
    engine, logits = engine_logits(tiny_llama, "bfloat16", "w8a8_int8", [list(range(3, 12))], 2)
    assert all(engine.model.get_submodule(name).weight.is_meta for name in quantized_names(engine.model))
    assert logits.shape == (3, 256) and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------ tensor parallelism

ROW_PARALLEL = ("attn.o", "mlp.down")  # each rank holds some input columns of these; the rest some output rows


def int8_in_a_rank(tiny_llama, prompts: list[list[int]], steps: int):
    """In one rank: ``engine_logits`` with int8wo in float32, and for every quantized layer this rank's integers,
    scales, and float weights as the rank loads them without quantization (its shard of the checkpoint's)."""
    engine, logits = engine_logits(tiny_llama, "float32", "int8wo", prompts, steps)
    floats = load_model(tiny_llama, torch.float32)
    weights = {}
    for name in quantized_names(engine.model):
        int8 = engine.model.get_submodule(name).weight.quantized
        weights[name] = (int8.q, int8.scale, floats.get_submodule(name).weight.detach())
    return weights, logits


@pytest.mark.ranks(2)
def test_each_rank_quantizes_its_own_shard(tiny_llama):
    """At TP 2 each rank quantizes the shard it loaded (``Engine`` calls ``quantize_model`` after ``load_model``,
    which reads only the rank's part of each checkpoint tensor): its integers and scales are
    ``quantize_per_channel`` of its own float weights, never a slice of the whole matrix's. A column-parallel
    layer's rows are whole on their rank, so its scales are TP 1's; a row-parallel layer's rows are cut by
    columns, so a rank's scale of a row is the largest |weight| of its half of the row (/ 127), and the larger of
    the two ranks' is TP 1's. The logits then differ from TP 1's int8 logits, by no more than the quantization
    error, and from the float ones (the int8 products ran: prompts of 2 tokens and steps of 2 rows, all within
    WEIGHT_ONLY_MAX_ROWS)."""
    prompts, steps = [[5, 6], [7, 8]], 3
    _, reference = engine_logits(tiny_llama, "float32", "", prompts, steps)
    engine, tp1 = engine_logits(tiny_llama, "float32", "int8wo", prompts, steps)
    whole = {name: engine.model.get_submodule(name).weight.quantized for name in quantized_names(engine.model)}
    ranks = run_ranks(2, int8_in_a_rank, tiny_llama, prompts, steps)

    for r, (weights, _) in enumerate(ranks):
        assert weights.keys() == whole.keys(), f"rank {r} quantized {sorted(weights)}, TP 1 {sorted(whole)}"
        for name, (q, scale, weight) in weights.items():
            row_parallel = name.endswith(ROW_PARALLEL)
            rows, columns = whole[name].q.shape
            shard = (rows, columns // 2) if row_parallel else (rows // 2, columns)
            assert q.shape == weight.shape == shard, (
                f"rank {r}, {name}: int8 weight {tuple(q.shape)}, float weight {tuple(weight.shape)}; its shard of "
                f"TP 1's {(rows, columns)} is {shard}"
            )
            own_q, own_scale = quantize_per_channel(weight)
            assert torch.equal(q, own_q) and torch.equal(scale, own_scale), (
                f"rank {r}, {name}: the int8 weight is not the quantization of the rank's own float shard"
            )
    for name in whole:
        if not name.endswith(ROW_PARALLEL):
            continue
        scale0, scale1 = (weights[name][1] for weights, _ in ranks)
        assert torch.equal(torch.maximum(scale0, scale1), whole[name].scale), (
            f"{name}: the larger of the ranks' scales of a row is not TP 1's (each rank's is its columns' max / 127)"
        )
        for r, scale in enumerate((scale0, scale1)):
            assert (scale < whole[name].scale).any(), (
                f"rank {r}, {name}: every row's scale is TP 1's: the whole rows' scales, not the rank's columns'"
            )
    head = [ranks[r][0]["lm_head"] for r in range(2)]  # column-parallel: rank 0 the first 128 tokens, rank 1 the rest
    assert torch.equal(torch.cat([head[0][0], head[1][0]]), whole["lm_head"].q), "lm_head: not TP 1's rows"
    assert torch.equal(torch.cat([head[0][1], head[1][1]]), whole["lm_head"].scale), "lm_head: not TP 1's scales"

    logits = ranks[0][1]
    for r, (_, got) in enumerate(ranks):
        assert got.shape == tp1.shape == (len(prompts) + steps * len(prompts), 256)
        assert torch.equal(got, logits), f"rank {r}'s logits differ from rank 0's"
    # The largest differences, in units of the float32 logits' standard deviation (0.70). Measured: TP 2's int8
    # logits are 0.028 off TP 1's int8 ones, and 0.062 off float32's (TP 1's int8: 0.063); the bound is about
    # three and a half times the first. Without int8 products TP 2 would be within float rounding of float32
    # (1e-5, chapter 04's test_tensor_parallel.py), far below 0.01.
    std = reference.std().item()
    from_tp1 = ((logits - tp1).abs().max() / std).item()
    from_float = ((logits - reference).abs().max() / std).item()
    assert from_tp1 <= 0.1, (
        f"TP 2's int8 logits off TP 1's int8 ones by {from_tp1:.3f} standard deviations (measured: 0.028)"
    )
    assert from_float >= 0.01, (
        f"TP 2's int8 logits off float32's by only {from_float:.2g} standard deviations (measured: 0.062): "
        "were the int8 weights used?"
    )


# ------------------------------------------------------------------------------ the default model

SYSTEM = ("You are a meticulous librarian in a small mountain town. You answer questions about books, reading "
          "and the history of libraries, briefly and kindly, and you never invent titles or authors. When you do "
          "not know something, you say so plainly and suggest where the reader could look it up.")
NEW_TOKENS = 24
# How many leading greedy tokens of NEW_TOKENS int8wo (bfloat16 activations) shares with transformers' float32,
# measured on this course's CPU (x86-64 with AVX-512): every one, for all three prompts.
AGREED = {"chat": 24, "code": 24, "long": 24}


def chat_ids(tokenizer, question: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def oracle_prompts(tokenizer) -> dict[str, list[int]]:
    """The three prompts the real-model tests decode: a chat question, a line of code, a long chat."""
    return {
        "chat": chat_ids(tokenizer, "What is the capital of France? Answer in one sentence."),
        "code": tokenizer.encode("def fibonacci(n):"),
        "long": chat_ids(tokenizer, "Which book should I read first?", SYSTEM),
    }


def transformers_greedy(model_path, prompts: dict[str, list[int]], new_tokens: int) -> dict[str, list[int]]:
    """transformers' float32 greedy tokens for each prompt, ``new_tokens`` of them (no end-of-sequence token, as
    ignore_eos gives ours)."""
    from transformers import AutoModelForCausalLM

    oracle = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    found = {}
    for uid, prompt in prompts.items():
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = oracle.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  do_sample=False, eos_token_id=None)
        found[uid] = out[0, len(prompt):].tolist()
    return found


@pytest.mark.real_model
def test_int8_weights_keep_the_default_models_first_greedy_tokens(model_path, tokenizer):
    from minisgl import LLM

    prompts = oracle_prompts(tokenizer)
    llm = LLM(model_path, dtype="bfloat16", quantization="int8wo", max_running_requests=4)
    model = llm.engine.model
    # Tied embeddings: the embedding scores the vocabulary with its int8 copy and still looks tokens up.
    assert len(quantized_names(model)) == 4 * model.config.num_layers + 1 and "embed" in quantized_names(model)
    # One prompt at a time: a decode step of one row, which the weight-only kernel takes (a batch of more than
    # WEIGHT_ONLY_MAX_ROWS rows would go to the bfloat16 weights).
    ours = {uid: llm.generate([prompt], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))[0].token_ids
            for uid, prompt in prompts.items()}
    del llm, model

    agreed = {}
    for uid, theirs in transformers_greedy(model_path, prompts, NEW_TOKENS).items():
        assert len(ours[uid]) == len(theirs) == NEW_TOKENS
        agreed[uid] = common_prefix(ours[uid], theirs)
        assert agreed[uid] >= AGREED[uid], (
            f"{uid}: int8wo agreed with transformers' float32 for {agreed[uid]} tokens, measured {AGREED[uid]}; "
            f"ours {ours[uid]}, transformers {theirs}"
        )


# ------------------------------------------------------------------------------ the server flag


def test_the_quantization_flag_offers_exactly_the_schemes(monkeypatch):
    from minisgl.args import parse_args

    assert parse_args([]).quantization == ""
    assert parse_args(["--quantization", "int8wo"]).quantization == "int8wo"
    with pytest.raises(SystemExit):
        parse_args(["--quantization", "int4"])
    offered = {}
    add_argument = argparse.ArgumentParser.add_argument

    def recording(self, *args, **kwargs):
        offered[kwargs.get("dest")] = kwargs.get("choices")
        return add_argument(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "add_argument", recording)
    parse_args([])
    assert set(offered["quantization"]) == {"", *SCHEMES}, "--quantization's choices and quantize.SCHEMES differ"
