"""Start-up facts, resolved once at launch into one frozen config that every process receives
(introduced in chapter 03).

Several processes need the same facts about the model: where its folder is, how long a sequence may
be, which tokens end a reply, how a chat becomes a prompt. If each process worked them out on its own,
they could disagree (one clamps the context length, another does not), and the scheduler would load a
whole tokenizer just to learn one token id. So the launcher reads the model folder once, here, and
hands the result to every child.

Nothing here imports torch or transformers' model code: the API server, which runs this, never needs
them. The files are read as plain JSON. ``config.json``'s model settings are read by the model's own
reader, ``ModelConfig`` (plain Python too), the one the schedulers build the model from, so the launcher
and the schedulers cannot read the file differently, and a model minisgl cannot run, or cannot split
over ``--tp-size`` ranks, is refused before any process starts. Only the end-of-sequence *token* named
by the tokenizer needs the tokenizer's vocabulary, and the small ``tokenizers`` library reads that.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .args import ServerArgs
from .core import pages_for
from .models.config import ModelConfig, check_tensor_parallel

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
    model = ModelConfig.from_dict(raw)
    check_tensor_parallel(model, args.tp_size)
    tokenizer_config = read_json(path / "tokenizer_config.json") or {}
    max_positions = model.max_position_embeddings
    if args.context_length > max_positions:
        logger.info("--context-length %d is longer than the model's %d positions: using %d",
                    args.context_length, max_positions, max_positions)
    return ServerConfig(
        args=args,
        model_path=str(path),
        model_name=args.served_model_name or path.name,
        context_length=min(args.context_length, max_positions),
        vocab_size=model.vocab_size,
        eos_token_ids=eos_token_ids(path, raw, tokenizer_config),
        chat_template=chat_template(path, tokenizer_config),
        num_pages=kv_cache_pages(args, min(args.context_length, max_positions)),
    )
# --8<-- [end:server-config]


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
    token there), and the tokenizer's own ``eos_token``, in that order, each once: the server's one set
    of end tokens (``ModelConfig`` carries none: the model itself does not need them)."""
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
