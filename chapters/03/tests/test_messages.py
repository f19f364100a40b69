"""Messages survive the trip through msgpack unchanged, and token ids travel packed."""

import msgspec
import pytest

from minisgl import messages as m
from minisgl.core import SamplingParams

PARAMS = SamplingParams(
    temperature=0.7, top_k=5, top_p=0.9, seed=3, max_tokens=None, stop=["\n\n", "END"], ignore_eos=True
)

EXAMPLES = [
    (m.ToTokenizer, m.TokenizeRequest("u-0", PARAMS, messages=[{"role": "user", "content": "日本語 😀"}])),
    (m.ToTokenizer, m.TokenizeRequest("u-1", PARAMS, input_ids=m.pack_ids([1, 2, 49151]))),
    (m.ToTokenizer, m.AbortRequest("u-2")),
    (m.ToScheduler, m.UserRequest("u-3", m.pack_ids(list(range(300))), PARAMS)),
    (m.ToScheduler, m.AbortRequest("u-4")),
    (m.ToDetokenizer,
     m.BatchTokenOutput(["a", "b"], m.pack_ids([17, -1]), [None, "stop"], [m.NewRequestInfo("a", 12, ["x"])])),
    (m.ToAPIServer, m.BatchTextOutput(["a"], ["héllo"], ["length"], [12], [7])),
    (m.ToAPIServer, m.TokenizeError("u-5", "too long", "prompt", "context_length_exceeded")),
]


@pytest.mark.parametrize("union, message", EXAMPLES)
def test_messages_round_trip_unchanged(union, message):
    assert m.decoder(union).decode(m.encode(message)) == message


def test_token_ids_travel_as_four_bytes_each():
    ids = list(range(1000, 1300)) + [-1, 2**31 - 1]
    packed = m.pack_ids(ids)
    assert len(packed) == 4 * len(ids) and m.unpack_ids(packed) == ids
    assert packed in m.encode(m.UserRequest("u", packed, PARAMS))  # one binary field, copied as it is


def test_a_socket_refuses_a_message_it_does_not_carry():
    with pytest.raises(msgspec.ValidationError):
        m.decoder(m.ToScheduler).decode(m.encode(m.BatchTextOutput([], [], [], [], [])))


def test_a_malformed_message_fails_to_decode():
    with pytest.raises(msgspec.DecodeError):
        m.decoder(m.ToScheduler).decode(b"\xc1 not msgpack")
