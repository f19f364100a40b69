"""The server's command line: every option in one dataclass (introduced in chapter 02).

Option names follow SGLang's and mini-sglang's, so that what you learn here carries over.
"""

import argparse
from dataclasses import dataclass, fields

from .default_model import default_model_path


@dataclass
class ServerArgs:
    model_path: str = ""  # empty: the course's default model
    dtype: str = "auto"
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 1919
    max_running_requests: int = 32
    context_length: int = 2048
    max_prefill_length: int = 4096
    num_tokenizer: int = 0  # 0: the detokenizer process tokenizes too
    served_model_name: str = ""  # empty: the model folder's name
    max_request_bytes: int = 1 << 20  # 1 MiB
    log_level: str = "info"


HELP = {
    "model_path": "a Hugging Face model folder (Llama, Qwen2 or Qwen3), or a hub id where a hub can be reached",
    "dtype": "auto (bfloat16 where the hardware is fast at it), float32, bfloat16 or float16",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "host": "address to listen on",
    "port": "port to listen on",
    "max_running_requests": "requests decoded together at most (one KV cache slot each)",
    "context_length": "longest prompt + reply a request may have (the size of a KV cache slot)",
    "max_prefill_length": "prompt tokens in one prefill batch at most (a longer prompt still runs, alone)",
    "num_tokenizer": "tokenizer worker processes (0: the detokenizer process tokenizes too)",
    "served_model_name": "the model name clients must send (default: the model folder's name)",
    "max_request_bytes": "a request body larger than this is refused with 413 before it is read whole",
    "log_level": "debug, info, warning or error",
}


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    parser = argparse.ArgumentParser(prog="python -m minisgl", description="An OpenAI-compatible LLM server.")
    choices = {"dtype": ["auto", "float32", "bfloat16", "float16"], "log_level": ["debug", "info", "warning", "error"]}
    for f in fields(ServerArgs):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(
            flag, type=type(f.default), default=f.default, choices=choices.get(f.name), help=HELP[f.name]
        )
    args = ServerArgs(**vars(parser.parse_args(argv)))
    if not args.model_path:
        args.model_path = str(default_model_path())
    if args.device != "auto" and args.device.split(":")[0] not in ("cpu", "cuda"):
        parser.error(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if args.num_tokenizer < 0:
        parser.error("--num-tokenizer must be 0 or more")
    for name in ("max_running_requests", "context_length", "max_prefill_length", "max_request_bytes"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args
