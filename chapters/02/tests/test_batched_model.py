"""The decoder over a batch of requests of different lengths, against transformers one at a time."""

import pytest
import torch

from minisgl.batch import Batch
from minisgl.layers.attention import decode_attention
from minisgl.models import load_model

PROMPTS = [[3, 17, 42, 99, 5, 250, 7], [128, 64, 77], [1, 33, 200, 9, 9, 14, 15, 16, 90, 91, 92]]


class Seq:
    """The three fields Batch.build reads, without the scheduler's Request."""

    def __init__(self, ids, slot, cached_len=0):
        self.ids, self.slot, self.cached_len = ids, slot, cached_len

    def uncached_ids(self):
        return self.ids[self.cached_len :]


@pytest.mark.exercise("decode-attention")
@torch.inference_mode()
def test_prefill_then_batched_decode_match_transformers(tiny_checkpoint, hf_model):
    ours, oracle = load_model(tiny_checkpoint), hf_model(tiny_checkpoint)
    cache = ours.new_kv_cache(num_slots=4, max_seq_len=32)
    # slots deliberately not 0, 1, 2: a request may live in any slot
    seqs = [Seq(p[:-2], slot) for p, slot in zip(PROMPTS, (2, 0, 3))]
    prefill = Batch.build(True, seqs, "cpu")
    hidden = ours(prefill, cache)
    for seq, full, logits in zip(seqs, PROMPTS, ours.logits(hidden[prefill.last_token])):
        expected = oracle(torch.tensor([full[:-2]])).logits[0, -1]
        assert (logits - expected).abs().max() <= 1e-4
        seq.cached_len = len(seq.ids)
    for step in (2, 1):  # two decode steps, one new token per request each
        for seq, full in zip(seqs, PROMPTS):
            seq.ids = full[: len(full) - step + 1]
        decode = Batch.build(False, seqs, "cpu")
        logits = ours.logits(ours(decode, cache)[decode.last_token])
        for seq, full, row in zip(seqs, PROMPTS, logits):
            expected = oracle(torch.tensor([seq.ids])).logits[0, -1]
            assert (row - expected).abs().max() <= 1e-4
            seq.cached_len = len(seq.ids)


@pytest.mark.exercise("decode-attention")
def test_decode_attention_matches_each_request_alone():
    torch.manual_seed(0)
    heads, kv_heads, d, slots, capacity = 6, 2, 8, 5, 12
    k_cache, v_cache = torch.randn(slots, capacity, kv_heads, d), torch.randn(slots, capacity, kv_heads, d)
    request_slots, lengths = torch.tensor([4, 1, 2]), torch.tensor([3, 12, 1])
    q = torch.randn(3, heads, d)
    out = decode_attention(q, k_cache, v_cache, request_slots, lengths, int(lengths.max()), d**-0.5)
    for b, (slot, length) in enumerate(zip(request_slots.tolist(), lengths.tolist())):
        keys, values = k_cache[slot, :length].transpose(0, 1), v_cache[slot, :length].transpose(0, 1)
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[b][:, None], keys, values, enable_gqa=True
        )[:, 0]  # one query per head, attending to every cached position of its own slot only
        torch.testing.assert_close(out[b], expected)
