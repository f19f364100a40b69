"""The tokenizer and detokenizer processes (introduced in chapter 03).

One function runs either role. A tokenizer worker pulls ``TokenizeRequest``s from the API server and
pushes ``UserRequest``s to the scheduler (or a ``TokenizeError`` back to the API server). The
detokenizer pulls the scheduler's ``BatchTokenOutput`` and pushes ``BatchTextOutput`` to the API
server. With ``--num-tokenizer 0`` one process does both, watching both sockets.

A request that makes the tokenizer or the decoder raise ends alone, with an error (``tokenize_one`` and
``Detokenizer.fail``); the worker goes on serving every other request (from chapter 06 on). In the complete
server a tokenizer also answers the API server's ``DecodeRequest``: a prompt's token ids as text, for an echo.
"""

import logging
import traceback

import zmq
from transformers import PreTrainedTokenizerFast

from ..config import ServerConfig
from ..ipc import Addresses, pull_socket, push_socket, receive_all
from ..messages import (
    DecodedText,
    DecodeRequest,
    ToDetokenizer,
    TokenizeError,
    TokenizeRequest,
    ToTokenizer,
    decoder,
    encode,
    unpack_ids,
)
from ..process import become_child
from .detokenize import Detokenizer
from .tokenize import Tokenizer

logger = logging.getLogger(__name__)


# --8<-- [start:worker]
def run_tokenizer_worker(
    config: ServerConfig, addresses: Addresses, name: str, tokenize: bool, detokenize: bool, ready
) -> None:
    become_child(name)
    logging.basicConfig(level=config.args.log_level.upper(), format=f"%(asctime)s %(levelname)s {name}: %(message)s")
    try:
        # The fast (Rust) tokenizer from tokenizer.json, named directly: AutoTokenizer would import torch
        # to look up model classes, and this process never runs a model.
        hf_tokenizer = PreTrainedTokenizerFast.from_pretrained(config.model_path)
        context = zmq.Context()
        to_scheduler = push_socket(context, addresses.scheduler)
        to_api = push_socket(context, addresses.api_server)
        poller, handlers = zmq.Poller(), {}
        if tokenize:
            tokenizer = Tokenizer(hf_tokenizer, config.context_length, config.vocab_size, config.chat_template)
            # The API server binds the PUSH end and round-robins over every connected tokenizer.
            requests = pull_socket(context, addresses.tokenizer, bind=False)
            handlers[requests] = (decoder(ToTokenizer), lambda m: tokenize_one(m, tokenizer, to_scheduler, to_api))
            poller.register(requests, zmq.POLLIN)
        if detokenize:
            detokenizer = Detokenizer(hf_tokenizer)
            tokens = pull_socket(context, addresses.detokenizer)
            handlers[tokens] = (decoder(ToDetokenizer), lambda m: detokenize_one(m, detokenizer, to_scheduler, to_api))
            poller.register(tokens, zmq.POLLIN)
    except Exception:
        ready.put((name, traceback.format_exc()))
        return
    ready.put((name, None))
    while True:
        for socket, _ in poller.poll():
            decode, handle = handlers[socket]
            for message in receive_all(socket, decode, 0):
                try:
                    handle(message)
                except Exception:  # a bug met by one message must not stop the others: log it, go on
                    logger.exception("could not handle a %s; going on", type(message).__name__)
# --8<-- [end:worker]


def tokenize_one(message, tokenizer: Tokenizer, to_scheduler, to_api) -> None:
    if isinstance(message, TokenizeRequest):
        try:
            result = tokenizer.tokenize(message)
        except Exception as error:  # the tokenizer choked on this request: refuse it alone, with the reason
            logger.exception("request %s: tokenizing it failed", message.uid)
            result = TokenizeError(message.uid, f"the tokenizer could not process this request: {error}")
        (to_api if isinstance(result, TokenizeError) else to_scheduler).send(encode(result))
    elif isinstance(message, DecodeRequest):  # ids back into text, for the API server (an echo of an ids prompt)
        try:
            answer = DecodedText(message.uid, tokenizer.decode(unpack_ids(message.input_ids)))
        except Exception as error:
            answer = TokenizeError(message.uid, f"could not turn the prompt's token ids into text: {error}", "prompt")
        to_api.send(encode(answer))
    else:  # an abort or a cache flush: forwarded in order, after the request it aborts if that came this way
        to_scheduler.send(encode(message))


def detokenize_one(message, detokenizer: Detokenizer, to_scheduler, to_api) -> None:
    for refusal in message.refused:  # the scheduler would not run it: the API server answers 400
        to_api.send(encode(refusal))
    texts, aborts = detokenizer.detokenize(message)
    if texts.uids:
        to_api.send(encode(texts))
    for abort in aborts:
        to_scheduler.send(encode(abort))
        logger.debug("stop string: aborting %s", abort.uid)

