"""Models: configuration, the decoder and weight loading (introduced in chapter 01)."""

from pathlib import Path

import torch

from .config import ModelConfig
from .decoder import CausalLM
from .weights import load_weights


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local folder as it is; a hub id such as ``Qwen/Qwen3-0.6B`` is downloaded first (config,
    tokenizer and safetensors only) into the Hugging Face cache, where a hub can be reached."""
    path = Path(name_or_path).expanduser()
    looks_like_hub_id = not path.exists() and not path.is_absolute() and str(name_or_path).count("/") == 1
    if not looks_like_hub_id:
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]
    return Path(snapshot_download(str(name_or_path), allow_patterns=patterns))


def load_model(model_path: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> CausalLM:
    """Build the model for ``model_path``'s config and fill it with the checkpoint's weights."""
    config = ModelConfig.from_path(model_path)
    # Build on the meta device (shapes only, no memory, no random init), then allocate the real
    # storage once: every parameter is about to be overwritten by the checkpoint anyway.
    with torch.device("meta"):
        model = CausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    model.rotary.to(device, dtype)
    load_weights(model, model_path)
    return model.eval()


__all__ = ["CausalLM", "ModelConfig", "load_model", "load_weights", "resolve_model_path"]
