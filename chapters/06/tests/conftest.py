"""Fixtures for chapter 06's tests: servers, the default model, tiny random models, and an API server whose
workers a task plays (``fake_workers``).

Without a GPU the Triton kernels run in Triton's interpreter, which reads ``TRITON_INTERPRET`` when a
kernel is decorated: it is set here, before any test module imports ``minisgl.kernels``.
"""

import asyncio
import os
import shutil
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from server_process import TEST_SERVER_ARGS, ServerProcess


@pytest.fixture(scope="session")
def start_server(request):
    """Start servers of this chapter's code; each is stopped at the end, even when a test fails."""
    started = []

    def start(*args, **kwargs) -> ServerProcess:
        server = ServerProcess(request.config.minisgl_root, *TEST_SERVER_ARGS, *args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def server(start_server):
    """The default model with the radix prefix cache (pages of 16 tokens, chunked prefill on: the defaults)."""
    return start_server("--cache-type", "radix")


@pytest.fixture(scope="session")
def model_path() -> Path:
    from minisgl.default_model import require_default_model

    return require_default_model()


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, model_path) -> Path:
    """A tiny random Llama with the default model's tokenizer and chat template: a server runs it, and its
    4 query heads and 2 KV heads split over 2 or 4 ranks. Its replies are noise; what is tested is the
    plumbing around them."""
    import torch
    import transformers

    real = transformers.AutoConfig.from_pretrained(model_path)
    config = transformers.LlamaConfig(
        vocab_size=real.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        eos_token_id=real.eos_token_id, bos_token_id=real.bos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder = tmp_path_factory.mktemp("tiny-chat")
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (model_path / name).is_file():
            shutil.copy(model_path / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama with a small vocabulary (256 tokens, 255 the EOS): fast enough for a scheduler to
    run hundreds of steps in a test. Its weights are perturbed so that greedy tokens vary from step to step;
    the scheduler's bookkeeping is real, its tokens are noise."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        eos_token_id=255, bos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.3 * noise if name.endswith("norm.weight") else 0.08 * noise)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    os.environ.setdefault("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def fake_workers(tmp_path):
    """The API server's app and frontend, with the workers played by a task: every request gets the text " {"
    and then the scheduler's dead end (as the detokenizer would pass it on)."""
    import httpx
    import zmq.asyncio

    from minisgl.args import ServerArgs
    from minisgl.config import ServerConfig
    from minisgl.ipc import Addresses, pull_socket, push_socket
    from minisgl.messages import DEAD_END, BatchTextOutput, TokenizeRequest, ToTokenizer, decoder, encode
    from minisgl.server.app import create_app
    from minisgl.server.frontend import Frontend

    addresses = Addresses.in_folder(tmp_path)
    frontend = Frontend(addresses)
    config = ServerConfig(ServerArgs(), str(tmp_path), "tiny", 128, 256, (255,), None, 0)
    app = create_app(frontend, config)

    context = zmq.asyncio.Context()  # the workers'; both contexts are destroyed at the end, sockets and all
    # One pair of sockets for every call a test makes: a new pull socket per call would leave the last call's
    # connected and unread, and the frontend's push socket, taking turns between its peers, could send a
    # request there, where nothing answers it.
    inbox = pull_socket(context, addresses.tokenizer, bind=False)
    outbox = push_socket(context, addresses.api_server)

    async def workers():
        messages = decoder(ToTokenizer)
        while True:
            message = messages.decode(await inbox.recv())
            if isinstance(message, TokenizeRequest):
                for text, finish, tokens in ((" {", None, 1), ("", DEAD_END, 1)):
                    await outbox.send(encode(BatchTextOutput([message.uid], [text], [finish], [3], [tokens], [0])))

    async def run(method, *args, **kwargs):
        tasks = [asyncio.ensure_future(frontend.receive_loop()), asyncio.ensure_future(workers())]
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
                return await getattr(client, method)(*args, **kwargs)
        finally:
            for task in tasks:
                task.cancel()

    yield lambda method, *args, **kwargs: asyncio.run(run(method, *args, **kwargs)), frontend
    context.destroy(linger=0)
    frontend.context.destroy(linger=0)
