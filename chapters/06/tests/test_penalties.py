"""Sampling penalties and min_p (the epilogue): ``frequency_penalty``, ``presence_penalty``, ``repetition_penalty``
and ``min_p``, as SGLang defines them.

- On small tensors, the batched code (``sampling.apply_penalties``, ``sampler``, ``count_tokens``) against a plain
  loop over each request's logits and history, with ``logit_bias`` and a grammar's mask in the same batch; min_p's
  cut against the probabilities computed by hand; the book's worked example; the fields' ranges.
- On the tiny model, the counts the engine keeps on the device are right under overlap scheduling (the CPU
  learns each token a step late), with slots reused by later requests; an unpenalized request's greedy tokens
  do not move when a penalized one shares its batch.
- Through the server, with the openai client: a frequency penalty makes a reply that repeats a word repeat it
  less, and a value out of range is a 400 that names the field.
"""

from types import SimpleNamespace

import httpx
import openai
import pytest
import test_paged_engine as paged
import torch
from test_paged_engine import TINY_EOS, Reply, common_prefix, run_until_idle, submit

from minisgl.core import InvalidParam, SamplingParams
from minisgl.engine import Engine
from minisgl.sampling import SamplingBatch, apply_penalties, count_tokens, make_generator, sampler
from minisgl.scheduler import Scheduler
from openai_contract import MODEL

one_thread = paged.one_thread  # every model here runs on one thread (see test_paged_engine.py)
NEG_INF = float("-inf")


# ------------------------------------------------------------------------ the plain computation


def naive_penalized(logits: list[float], generated: list[int], params: SamplingParams) -> list[float]:
    """One request's logits after its penalties, token by token: frequency and presence subtract, then the
    repetition penalty divides a used token's positive logit, or multiplies its negative one."""
    out = []
    for token, logit in enumerate(logits):
        n = generated.count(token)
        logit -= params.frequency_penalty * n + params.presence_penalty * (n > 0)
        if n > 0:
            logit = logit / params.repetition_penalty if logit > 0 else logit * params.repetition_penalty
        out.append(logit)
    return out


def batch_with_history(params: list[SamplingParams], histories: list[list[int]], vocab: int, mask=None,
                       slots: list[int] | None = None) -> SamplingBatch:
    """A SamplingBatch whose request i sits in slot ``slots[i]`` of the engine-like counts, which hold the
    counts of ``histories[i]``, the tokens it generated so far."""
    slots = slots if slots is not None else list(range(len(params)))
    counts = torch.zeros(max(slots) + 2, vocab, dtype=torch.int32)  # a spare slot that nobody reads
    counts[-1] = 7
    for slot, history in zip(slots, histories):
        for token in history:
            counts[slot, token] += 1
    requests = [SimpleNamespace(uid=f"r{i}", params=p, generator=make_generator(i), slot=slot)
                for i, (p, slot) in enumerate(zip(params, slots))]
    return SamplingBatch.build(requests, "cpu", mask, counts)


MIXED = [SamplingParams(frequency_penalty=0.7), SamplingParams(presence_penalty=-1.3),
         SamplingParams(repetition_penalty=1.6), SamplingParams(repetition_penalty=0.5), SamplingParams(),
         SamplingParams(frequency_penalty=-0.4, presence_penalty=1.1, repetition_penalty=1.3),
         SamplingParams(frequency_penalty=2.0, presence_penalty=2.0, repetition_penalty=2.0)]


def random_case(seed: int, vocab: int = 12):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(len(MIXED), vocab, generator=generator)
    histories = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in (5, 3, 6, 4, 8, 7, 0)]
    return logits, histories


# ------------------------------------------------------------------------ on small tensors


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_penalties_are_what_a_loop_over_each_request_computes(seed):
    logits, histories = random_case(seed)
    slots = [4, 0, 6, 2, 1, 5, 3]  # rows and slots differ: each row must read its own slot
    batch = batch_with_history(MIXED, histories, logits.shape[1], slots=slots)
    penalized = logits.clone()
    apply_penalties(penalized, batch)
    for row, (params, history) in enumerate(zip(MIXED, histories)):
        expected = naive_penalized(logits[row].tolist(), history, params)
        assert penalized[row].tolist() == pytest.approx(expected, abs=1e-5), f"row {row}: {params}, {history}"
    assert torch.equal(penalized[4], logits[4]), "a row without penalties keeps its logits exactly"


def test_penalties_then_bias_then_mask_then_greedy_as_the_loop_does():
    logits, histories = random_case(3)
    bias = {0: {1: 2.5}, 2: {3: -4.0, 5: 1.0}, 4: {0: 100.0}, 5: {7: 3.0}}
    forbidden = {1: [0, 2, 4, 6, 8], 5: [1, 2, 3]}
    params = [SamplingParams(**{**vars(p), "logit_bias": bias.get(row, {})}) for row, p in enumerate(MIXED)]

    def mask(rows: torch.Tensor) -> None:
        for row, tokens in forbidden.items():
            rows[row, tokens] = NEG_INF

    batch = batch_with_history(params, histories, logits.shape[1], mask)
    changed = logits.clone()
    tokens, _ = sampler(changed, batch)  # changes its logits in place: penalties, bias, mask
    for row, (p, history) in enumerate(zip(params, histories)):
        expected = naive_penalized(logits[row].tolist(), history, p)
        for token, value in p.logit_bias.items():
            expected[token] += value
        for token in forbidden.get(row, []):
            expected[token] = NEG_INF
        assert changed[row].tolist() == pytest.approx(expected, abs=1e-5), f"row {row}"
        assert tokens[row].item() == max(range(len(expected)), key=expected.__getitem__), f"row {row}"


def test_each_step_adds_its_sampled_tokens_to_the_penalized_slots_only():
    logits, histories = random_case(4)
    slots = [4, 0, 6, 2, 1, 5, 3]
    batch = batch_with_history(MIXED, histories, logits.shape[1], slots=slots)
    before = batch.penalties.counts.clone()
    tokens, _ = sampler(logits.clone(), batch)
    count_tokens(tokens, batch.penalties)
    added = batch.penalties.counts - before
    for row, slot in enumerate(slots):
        expected = torch.zeros(logits.shape[1], dtype=torch.int32)
        if MIXED[row].penalized:
            expected[tokens[row]] = 1
        assert torch.equal(added[slot], expected), f"row {row} (slot {slot})"
    assert not added[-1].any(), "the spare slot is nobody's"


def test_nothing_is_built_for_a_batch_without_penalties_or_min_p():
    requests = [SimpleNamespace(uid="a", params=SamplingParams(temperature=0.7), generator=make_generator(0)),
                SimpleNamespace(uid="b", params=SamplingParams(min_p=0.3), generator=make_generator(1))]  # greedy
    batch = SamplingBatch.build(requests, "cpu")
    assert batch.penalties is None and batch.min_p is None


def min_p_allowed(logits: list[float], temperature: float, min_p: float) -> set[int]:
    """The tokens min_p leaves, by hand: at least min_p times as likely as the likeliest, after temperature."""
    weights = [torch.tensor(value / temperature).exp().item() for value in logits]
    return {token for token, w in enumerate(weights) if w >= min_p * max(weights)}


def test_min_p_draws_exactly_the_tokens_above_its_cut():
    logits = torch.tensor([[2.0, 1.6, 0.9, 0.2, -0.5, 1.9],
                           [0.0, 1.0, 2.0, 3.0, 2.5, 2.9],
                           [1.0, 1.0, 1.0, 1.0, 1.0, 5.0]])
    params = [SamplingParams(temperature=0.8, min_p=0.3, seed=1),
              SamplingParams(temperature=1.3, min_p=0.4, frequency_penalty=1.0, seed=2),  # after the penalty
              SamplingParams(temperature=0.7, min_p=1.0, seed=3)]  # only the likeliest
    histories = [[], [3, 3], []]
    batch = batch_with_history(params, histories, logits.shape[1])
    drawn = [set() for _ in params]
    for _ in range(300):
        tokens, _ = sampler(logits.clone(), batch)
        for row, token in enumerate(tokens.tolist()):
            drawn[row].add(token)
    for row, (p, history) in enumerate(zip(params, histories)):
        allowed = min_p_allowed(naive_penalized(logits[row].tolist(), history, p), p.temperature, p.min_p)
        assert drawn[row] == allowed, f"row {row} drew {sorted(drawn[row])}, min_p allows {sorted(allowed)}"
    assert drawn[1] == {2, 4, 5}, "row 1's token 3 (logit 3.0, used twice) falls to 1.0, under the cut"
    assert drawn[2] == {5}


def test_the_books_worked_example():
    """docs/chapters/06-epilogue.md, "Penalties": ' very' used 3 times, '!' once; logits 3, 2, 1, -1."""
    logits = torch.tensor([[3.0, 2.0, 1.0, -1.0]] * 3)
    params = [SamplingParams(frequency_penalty=0.4), SamplingParams(presence_penalty=0.4),
              SamplingParams(repetition_penalty=1.25)]
    batch = batch_with_history(params, [[0, 0, 0, 3]] * 3, 4)
    penalized = logits.clone()
    apply_penalties(penalized, batch)
    assert penalized.tolist() == [pytest.approx(row) for row in ([1.8, 2.0, 1.0, -1.4], [2.6, 2.0, 1.0, -1.4],
                                                                  [2.4, 2.0, 1.0, -1.25])]
    rows = torch.softmax(torch.cat((logits[:1], penalized)), dim=-1).tolist()
    probabilities = [[round(p, 3) for p in row] for row in rows]
    assert probabilities == [[0.657, 0.242, 0.089, 0.012], [0.369, 0.450, 0.166, 0.015],
                             [0.565, 0.310, 0.114, 0.010], [0.515, 0.345, 0.127, 0.013]]
    assert min_p_allowed([3.0, 2.0, 1.0, -1.0], 1.0, 0.1) == {0, 1, 2}  # the cut: 0.1 x 0.657 = 0.066


@pytest.mark.parametrize("field, bad, good", [
    ("frequency_penalty", 2.5, -2.0), ("frequency_penalty", float("nan"), 2.0),
    ("presence_penalty", -2.01, 2.0), ("repetition_penalty", 0.0, 2.0), ("repetition_penalty", 2.5, 0.1),
    ("min_p", -0.1, 1.0), ("min_p", 1.5, 0.0),
])
def test_each_field_has_sglangs_range(field, bad, good):
    SamplingParams(**{field: good})
    with pytest.raises(InvalidParam) as refused:
        SamplingParams(**{field: bad})
    assert refused.value.param == field and field in str(refused.value)


# ------------------------------------------------------------------------ the engine, on the tiny model


@pytest.fixture(scope="module")
def penalized_oracle(tiny_llama):
    """Greedy tokens of the tiny model by transformers (a full forward pass per token), each step's logits
    penalized by ``naive_penalized`` with the tokens so far, and how far the best was ahead of the second."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()

    @torch.inference_mode()
    def generate(prompt: list[int], params: SamplingParams) -> tuple[list[int], list[float]]:
        tokens, margins = [], []
        while len(tokens) < params.max_tokens:
            logits = naive_penalized(model(torch.tensor([prompt + tokens])).logits[0, -1].tolist(), tokens, params)
            best, second = sorted(range(len(logits)), key=logits.__getitem__, reverse=True)[:2]
            margins.append(logits[best] - logits[second])
            tokens.append(best)
        return tokens, margins

    return generate


# Five requests through two slots, so that later requests reuse the slots (and counts) of earlier ones;
# prompts longer than a chunk of 8, so that the first token comes after several steps of prefill.
REQUESTS = {
    "freq": ([5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], dict(frequency_penalty=2.0)),
    "plain": ([20, 21, 22], {}),
    "pres": ([30, 31, 32, 33, 34, 35, 36, 37, 38, 39], dict(presence_penalty=1.5)),
    "rep": ([40, 41, 42, 43], dict(repetition_penalty=1.8)),
    "all": ([50, 51, 52, 53, 54, 55, 56, 57, 58], dict(frequency_penalty=0.5, presence_penalty=0.5,
                                                        repetition_penalty=1.5)),
}


def run_requests(tiny_llama, overlap: bool, requests: dict, max_running: int = 2) -> dict[str, Reply]:
    engine = Engine(tiny_llama, "float32", "cpu", 64 + 1, 4, 128, max_running_requests=max_running)
    scheduler = Scheduler(engine, max_running, 8, {TINY_EOS}, "radix", overlap=overlap)
    replies: dict[str, Reply] = {}
    for uid, (prompt, params) in requests.items():
        submit(scheduler, uid, prompt, max_tokens=20, ignore_eos=True, **params)
    run_until_idle(scheduler, replies, 200)
    return replies


@pytest.mark.parametrize("overlap", [False, True])
def test_penalized_greedy_tokens_are_the_loops_with_slots_reused(tiny_llama, penalized_oracle, overlap):
    replies = run_requests(tiny_llama, overlap, REQUESTS)
    changed = 0
    for uid, (prompt, params) in REQUESTS.items():
        params = SamplingParams(max_tokens=20, **params)
        expected, margins = penalized_oracle(prompt, params)
        got = replies[uid].tokens
        n = common_prefix(got, expected)
        if n < len(expected):  # they part at token n: only a near-tie may explain it
            assert margins[n] < 1e-4, f"{uid}: {got}, the loop says {expected}; apart at token {n}"
        changed += params.penalized and got != penalized_oracle(prompt, SamplingParams(max_tokens=20))[0]
    assert changed >= 3, "the penalties should change most of the penalized replies"


def test_an_unpenalized_request_keeps_its_greedy_tokens_beside_a_penalized_one(tiny_llama):
    plain = ([20, 21, 22, 23, 24], {})
    alone = run_requests(tiny_llama, True, {"plain": plain})["plain"].tokens
    beside = run_requests(tiny_llama, True, {"freq": REQUESTS["freq"], "plain": plain})
    assert beside["plain"].tokens == alone
    unpenalized = run_requests(tiny_llama, True, {"freq": (REQUESTS["freq"][0], {})})["freq"].tokens
    assert beside["freq"].tokens != unpenalized, "the premise: its penalty changed its own reply"


# ------------------------------------------------------------------------ through the server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


REPEAT = "Write the word 'hello' twenty times, separated by spaces, and nothing else."


def test_a_frequency_penalty_makes_a_repeated_word_repeat_less(client):
    def reply(**kwargs) -> str:
        messages = [{"role": "user", "content": REPEAT}]
        answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0,
                                                **kwargs)
        return answer.choices[0].message.content.lower()

    free, penalized = reply(), reply(frequency_penalty=2)
    assert free.count("hello") >= 8, f"the premise: left alone, the model repeats the word: {free!r}"
    assert penalized.count("hello") < free.count("hello") // 2, penalized
    assert reply(frequency_penalty=0, presence_penalty=0) == free, "neutral values change nothing"


def test_generate_takes_sglangs_penalties_and_min_p(server, client):
    body = {"text": REPEAT, "sampling_params": {"max_new_tokens": 24, "temperature": 0}}
    free = httpx.post(server.url + "/generate", json=body, timeout=120).json()["text"]
    body["sampling_params"] |= {"repetition_penalty": 2.0, "min_p": 0.1}
    response = httpx.post(server.url + "/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["text"] != free


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/chat/completions", {"frequency_penalty": 2.5}, "frequency_penalty"),
    ("/v1/chat/completions", {"presence_penalty": -3}, "presence_penalty"),
    ("/v1/completions", {"frequency_penalty": -2.5}, "frequency_penalty"),
    ("/v1/completions", {"min_p": 1.5}, "min_p"),
    ("/generate", {"sampling_params": {"repetition_penalty": 0}}, "sampling_params.repetition_penalty"),
    ("/generate", {"sampling_params": {"min_p": -0.1}}, "sampling_params.min_p"),
    ("/generate", {"sampling_params": {"presence_penalty": 2.1}}, "sampling_params.presence_penalty"),
])
def test_a_penalty_out_of_range_is_a_400_that_names_it(server, path, extra, param):
    prompt = {"/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
              "/v1/completions": {"model": MODEL, "prompt": "hi"}, "/generate": {"text": "hi"}}[path]
    response = httpx.post(server.url + path, json={**prompt, **extra}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param.split(".")[-1] in error["message"], error
