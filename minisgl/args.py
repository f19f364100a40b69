"""The server's command line: every option in one dataclass (introduced in chapter 02).

Option names follow SGLang's and mini-sglang's, so that what you learn here carries over.
"""

import argparse
import importlib.util
from dataclasses import dataclass, fields

from .default_model import default_model_path


@dataclass
class ServerArgs:
    model_path: str = ""  # empty: the course's default model
    dtype: str = "auto"
    quantization: str = ""  # empty: weights in --dtype; int8wo, w8a8_int8, int4wo-32 (``layers/quantize.py``)
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 1919
    max_running_requests: int = 32
    context_length: int = 2048
    chunked_prefill_size: int = 512  # prompt tokens run in one step at most, a long prompt in chunks (0: whole)
    page_size: int = 16  # tokens per KV cache page
    num_pages: int = 0  # KV cache pages; 0: as many as --max-running-requests requests of --context-length need
    kv_cache_memory: int = 0  # MiB of KV cache per rank, instead of --num-pages; 0: not used
    attention_backend: str = "auto"  # torch, triton, or auto: triton on a GPU, torch on a CPU
    enable_torch_compile: bool = False  # the torch backend's decodes of mixed lengths, compiled (a CPU's c32 speed)
    cuda_graph_max_bs: int = 32  # CUDA graphs of decode steps up to this batch size (GPU, triton backend)
    disable_cuda_graph: bool = False
    # Overlap scheduling: build the next step while the device runs this one. On by default on a GPU; off on a
    # CPU, where it measured slower (``overlap_schedule``; the numbers are in chapter 06).
    disable_overlap_schedule: bool = False
    enable_overlap_schedule: bool = False
    cache_type: str = "radix"  # radix: share the pages of common prefixes; naive: free everything at finish
    num_tokenizer: int = 0  # 0: the detokenizer process tokenizes too
    served_model_name: str = ""  # empty: the model folder's name
    max_request_bytes: int = 1 << 20  # 1 MiB
    max_queued_requests: int = 1024  # accepted beyond the running ones; more get 503 (0: no limit)
    api_key: str = ""  # empty: no key needed
    log_level: str = "info"
    tp_size: int = 1  # tensor-parallel ranks: scheduler processes, each with a shard of every layer
    nnodes: int = 1  # machines the ranks are spread over, tp_size / nnodes ranks on each
    node_rank: int = 0  # which of them this is; node 0 runs the HTTP server, tokenizers and detokenizer
    dist_init_addr: str = ""  # host:port of the ranks' rendezvous (on node 0); empty: a free local port
    dist_timeout: int = 300  # seconds a rank waits for the others, at the rendezvous or in a collective
    tp_check_lockstep: bool = False  # debug: after every step, check that every rank sampled the same tokens
    dp_size: int = 1  # data-parallel replicas: whole servers behind SGLang's Model Gateway (``server/replicas.py``)
    router_policy: str = "cache_aware"  # how the gateway picks a replica for each request
    shell: bool = False  # chat in the terminal instead of serving HTTP


HELP = {
    "model_path": "a Hugging Face model folder (Llama, Qwen2 or Qwen3), or a hub id where a hub can be reached",
    "dtype": "auto (bfloat16 where the hardware is fast at it), float32, bfloat16 or float16",
    "quantization": "quantized weights, made at load time: int8wo (int8 weights, one scale per output row, SGLang's "
                    "--torchao-config int8wo: faster decoding of one or two requests), w8a8_int8 (activations "
                    "quantized at run time too: faster still, and too inaccurate on the default model) or int4wo-32 "
                    "(int4 weights, one scale per 32, the LM head int8: fastest for up to 4 requests); empty: none",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "host": "address to listen on",
    "port": "port to listen on",
    "max_running_requests": "requests decoded together at most (each with the KV cache pages it needs)",
    "context_length": "longest prompt + reply a request may have (a larger one needs more KV cache pages)",
    "chunked_prefill_size": "prompt tokens run in one step at most; a longer prompt is prefilled in chunks (0: whole)",
    "page_size": "tokens per KV cache page",
    "num_pages": "KV cache pages (0: enough for --max-running-requests requests of --context-length tokens)",
    "kv_cache_memory": "MiB of KV cache per rank: as many pages as fit, instead of --num-pages (0: not used)",
    "attention_backend": "auto: triton on a GPU, torch on a CPU (triton on a CPU: Triton's interpreter, for tests)",
    "enable_torch_compile": "compile the torch attention backend's decode attention with torch.compile: about twice "
                            "as fast for many requests of different lengths on a CPU; the first such batch waits "
                            "a few seconds for the compiler (its output is cached on disk for later starts)",
    "cuda_graph_max_bs": "capture CUDA graphs of decode steps for batches up to this size (GPU and triton only)",
    "disable_cuda_graph": "run every decode step eagerly, without CUDA graphs",
    "disable_overlap_schedule": "build each step after the last one's tokens are back (the default on a CPU)",
    "enable_overlap_schedule": "build the next step while the device runs this one (the default on a GPU)",
    "cache_type": "radix: requests that share a prefix share its pages; naive: free every page when a request ends",
    "num_tokenizer": "tokenizer worker processes (0: the detokenizer process tokenizes too)",
    "served_model_name": "the model name clients must send (default: the model folder's name)",
    "max_request_bytes": "a request body larger than this is refused with 413 before it is read whole",
    "max_queued_requests": "requests accepted beyond --max-running-requests, waiting; more are refused with 503 "
                           "and Retry-After (0: no limit)",
    "api_key": "clients must send 'Authorization: Bearer KEY' (every endpoint but /health); empty: no key",
    "log_level": "debug, info, warning or error",
    "tp_size": "tensor-parallel ranks, each holding a shard of every layer (must divide the attention heads)",
    "nnodes": "machines the ranks are spread over (tp-size / nnodes ranks on each)",
    "node_rank": "which machine this is, 0 .. nnodes - 1; node 0 serves HTTP and runs rank 0",
    "dist_init_addr": "host:port where the ranks meet (a port on node 0); needed with --nnodes > 1",
    "dist_timeout": "seconds a rank waits for the others (at the rendezvous or in a collective) before failing",
    "tp_check_lockstep": "debug: after every step, compare the tokens every rank sampled (costs an all-gather)",
    "dp_size": "data-parallel replicas: N whole servers, each with these options, behind SGLang's Model Gateway "
               "listening on --host and --port (needs: pip install sglang-router)",
    "router_policy": "how the gateway picks a replica: cache_aware (where the prompt's prefix is likely cached), "
                     "round_robin, random, power_of_two (the less loaded of two) or manual",
    "shell": "chat with the model in this terminal (no server): /reset starts over, /exit leaves",
}


# Other names a flag answers to: the ones mini-sglang uses, where ours follow SGLang.
ALIASES = {"chunked_prefill_size": ["--max-prefill-length"]}
# The policies of SGLang's Model Gateway (``smg launch --policy``).
ROUTER_POLICIES = ["cache_aware", "round_robin", "random", "power_of_two", "manual"]


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    parser = argparse.ArgumentParser(prog="python -m minisgl", description="An OpenAI-compatible LLM server.")
    choices = {"dtype": ["auto", "float32", "bfloat16", "float16"], "log_level": ["debug", "info", "warning", "error"],
               "cache_type": ["radix", "naive"], "attention_backend": ["auto", "torch", "triton"],
               "quantization": ["", "int8wo", "w8a8_int8", "int4wo-32"],
               "router_policy": ROUTER_POLICIES}
    for f in fields(ServerArgs):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):  # a switch: present or not
            parser.add_argument(flag, action="store_true", help=HELP[f.name])
            continue
        parser.add_argument(
            flag, *ALIASES.get(f.name, []), dest=f.name, type=type(f.default), default=f.default,
            choices=choices.get(f.name), help=HELP[f.name],
        )
    args = ServerArgs(**vars(parser.parse_args(argv)))
    if not args.model_path:
        args.model_path = str(default_model_path())
    if args.device != "auto" and args.device.split(":")[0] not in ("cpu", "cuda"):
        parser.error(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if args.num_tokenizer < 0:
        parser.error("--num-tokenizer must be 0 or more")
    for name in ("max_running_requests", "context_length", "page_size", "max_request_bytes", "tp_size",
                 "nnodes", "dist_timeout", "dp_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("chunked_prefill_size", "num_pages", "kv_cache_memory", "cuda_graph_max_bs", "max_queued_requests"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 or more")
    if args.disable_overlap_schedule and args.enable_overlap_schedule:
        parser.error("give --disable-overlap-schedule or --enable-overlap-schedule, not both")
    if args.num_pages and args.kv_cache_memory:
        parser.error("give --num-pages or --kv-cache-memory, not both: they size the same pool")
    if args.tp_size % args.nnodes:
        parser.error(f"--tp-size {args.tp_size} does not split evenly over --nnodes {args.nnodes}")
    if not 0 <= args.node_rank < args.nnodes:
        last = args.nnodes - 1
        parser.error(f"--node-rank {args.node_rank} is out of range: with --nnodes {args.nnodes} it is 0 .. {last}")
    if args.nnodes > 1 and not args.dist_init_addr:
        parser.error("--nnodes > 1 needs --dist-init-addr HOST:PORT, an address of node 0 that every node can reach")
    if args.dist_init_addr and not valid_address(args.dist_init_addr):
        parser.error(f"--dist-init-addr must be HOST:PORT, got {args.dist_init_addr!r}")
    if args.dp_size > 1:
        check_replicas(parser, args)
    elif args.router_policy != ServerArgs.router_policy:
        parser.error("--router-policy picks among replicas: it needs --dp-size 2 or more")
    return args


def check_replicas(parser: argparse.ArgumentParser, args: ServerArgs) -> None:
    """--dp-size N starts N servers on this machine behind SGLang's Model Gateway, which must be installed."""
    if args.shell or args.nnodes > 1:
        parser.error("--dp-size starts replicas of the server on this machine: not with --shell or --nnodes "
                     "(for replicas on several machines, see docs/setup.md)")
    if importlib.util.find_spec("sglang_router") is None:
        parser.error("--dp-size > 1 puts the replicas behind SGLang's Model Gateway, which is not installed: "
                     "pip install sglang-router (wheels for x86-64 Linux)")


def to_argv(args: ServerArgs) -> list[str]:
    """The command line that parses back to ``args``: every option that differs from its default."""
    argv = []
    for f in fields(ServerArgs):
        value, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
        if value != f.default:
            argv += [flag] if isinstance(value, bool) else [flag, str(value)]
    return argv


def overlap_schedule(args: ServerArgs, device_type: str) -> bool:
    """Whether the scheduler overlaps: as the flags say, else where it pays: on a GPU (see chapter 06)."""
    if args.disable_overlap_schedule or args.enable_overlap_schedule:
        return args.enable_overlap_schedule
    return device_type == "cuda"


def valid_address(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536
