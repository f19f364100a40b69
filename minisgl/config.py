"""Start-up facts, resolved once at launch into one frozen config that every process receives
(introduced in chapter 03).

Several processes need the same facts about the model: where its folder is, how long a sequence may
be, which tokens end a reply, how a chat becomes a prompt. If each process worked them out on its own,
they could disagree (one clamps the context length, another does not), and the scheduler would load a
whole tokenizer just to learn one token id. So the launcher reads the model folder once, here, and
hands the result to every child.

Nothing here imports torch or transformers' model code: the API server, which runs this, never needs
them. The files are read as plain JSON; only the end-of-sequence *token* named by the tokenizer needs
the tokenizer's vocabulary, and the small ``tokenizers`` library reads that.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .args import ServerArgs
from .core import pages_for

logger = logging.getLogger(__name__)


# --8<-- [start:server-config]
@dataclass(frozen=True)
class ServerConfig:
    args: ServerArgs  # what was asked for on the command line
    model_path: str  # a local model folder
    model_name: str  # the name clients send as "model"
    context_length: int  # the longest prompt + reply: --context-length, clamped to the model's positions
    vocab_size: int
    eos_token_ids: tuple[int, ...]  # any of these ends a reply (unless ignore_eos)
    chat_template: str | None  # the Jinja template that turns messages into a prompt; None: chats refused
    num_pages: int  # KV cache pages, the spare page 0 included; 0: the engine fits them to --kv-cache-memory


def resolve_config(args: ServerArgs) -> ServerConfig:
    path = local_model_folder(args.model_path)
    raw = read_json(path / "config.json")
    if raw is None:
        raise FileNotFoundError(f"no config.json in model folder {path}")
    tokenizer_config = read_json(path / "tokenizer_config.json") or {}
    heads = raw["num_attention_heads"]
    check_tp_size(args.tp_size, heads, raw.get("num_key_value_heads", heads), raw["intermediate_size"])
    max_positions = raw.get("max_position_embeddings", 2048)
    if args.context_length > max_positions:
        logger.info("--context-length %d is longer than the model's %d positions: using %d",
                    args.context_length, max_positions, max_positions)
    return ServerConfig(
        args=args,
        model_path=str(path),
        model_name=args.served_model_name or path.name,
        context_length=min(args.context_length, max_positions),
        vocab_size=raw["vocab_size"],
        eos_token_ids=eos_token_ids(path, raw, tokenizer_config),
        chat_template=chat_template(path, tokenizer_config),
        num_pages=kv_cache_pages(args, min(args.context_length, max_positions)),
    )
# --8<-- [end:server-config]


# --8<-- [start:check-tp-size]
def tensor_parallel_problem(tp_size: int, num_heads: int, num_kv_heads: int, intermediate_size: int) -> str | None:
    """Why a model cannot be split across ``tp_size`` ranks, or None if it can (introduced in chapter 04).

    Every rank gets the same number of query heads and the same slice of the MLP. KV heads are split
    the same way when there are at least as many as ranks; with fewer, each is held by a group of ranks
    (replicated), which works when the ranks divide evenly among them. The vocabulary need not divide:
    the embedding and the LM head pad it (``layers/embedding.py``).
    """
    if num_heads % tp_size:
        return f"does not divide the model's {num_heads} attention heads"
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        return f"and the model's {num_kv_heads} KV heads do not divide one another"
    if intermediate_size % tp_size:
        return f"does not divide the model's {intermediate_size} MLP intermediate features"
    return None


def check_tp_size(tp_size: int, num_heads: int, num_kv_heads: int, intermediate_size: int) -> None:
    """Refuse a TP size the model cannot be split by, naming the numbers and the sizes that work."""
    if tp_size < 1:
        raise ValueError(f"--tp-size must be at least 1, got {tp_size}")
    problem = tensor_parallel_problem(tp_size, num_heads, num_kv_heads, intermediate_size)
    if problem:
        sizes = [n for n in range(1, num_heads + 1)
                 if tensor_parallel_problem(n, num_heads, num_kv_heads, intermediate_size) is None]
        raise ValueError(f"--tp-size {tp_size} {problem}: use a TP size the model can be split by "
                         f"({', '.join(map(str, sizes))})")
# --8<-- [end:check-tp-size]


def kv_cache_pages(args: ServerArgs, context_length: int) -> int:
    """The pool's pages, the spare page included (introduced in chapter 05): --num-pages, or by default as
    many as --max-running-requests requests of the whole context length would fill. The pool must hold at
    least one request of the whole context length, or such a request would wait forever. With
    --kv-cache-memory, 0: the engine sizes the pool, since only it knows the dtype's size."""
    if args.kv_cache_memory:
        return 0
    per_request = pages_for(context_length, args.page_size)
    num_pages = args.num_pages or args.max_running_requests * per_request + 1
    if num_pages - 1 < per_request:
        raise ValueError(f"--num-pages {num_pages} holds {num_pages - 1} usable pages of {args.page_size} tokens, "
                         f"fewer than one request of --context-length {context_length} needs ({per_request})")
    return num_pages


def local_model_folder(name_or_path: str) -> Path:
    """A local folder as it is; a hub id such as ``Qwen/Qwen3-0.6B`` is downloaded first (config,
    tokenizer and safetensors only) into the Hugging Face cache, where a hub can be reached."""
    path = Path(name_or_path).expanduser()
    looks_like_hub_id = not path.exists() and not path.is_absolute() and str(name_or_path).count("/") == 1
    if not looks_like_hub_id:
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]
    return Path(snapshot_download(str(name_or_path), allow_patterns=patterns))


def eos_token_ids(path: Path, raw: dict, tokenizer_config: dict) -> tuple[int, ...]:
    """The end ids of config.json, of generation_config.json (chat models often add their end-of-turn
    token there), and the tokenizer's own ``eos_token``, in that order, each once."""
    generation_config = read_json(path / "generation_config.json") or {}
    ids = as_list(raw.get("eos_token_id")) + as_list(generation_config.get("eos_token_id"))
    eos = tokenizer_config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos and (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        eos_id = Tokenizer.from_file(str(path / "tokenizer.json")).token_to_id(eos)
        ids += [] if eos_id is None else [eos_id]
    return tuple(dict.fromkeys(ids))


def chat_template(path: Path, tokenizer_config: dict) -> str | None:
    """transformers 5 saves the template as chat_template.jinja; older folders keep it in tokenizer_config.json."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def as_list(value) -> list[int]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]
