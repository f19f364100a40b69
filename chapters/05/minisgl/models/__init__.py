"""Models: configuration, the decoder and weight loading (introduced in chapter 01)."""

from pathlib import Path

import torch

from ..distributed import tp_info
from .config import ModelConfig, check_tensor_parallel
from .decoder import CausalLM
from .weights import load_weights


def load_model(model_path: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> CausalLM:
    """Build the model for ``model_path``'s config and fill it with the checkpoint's weights: this rank's
    share of them, under tensor parallelism (``distributed.tp_info()``)."""
    config = ModelConfig.from_path(model_path)
    check_tensor_parallel(config, tp_info().size)
    # Build on the meta device (shapes only, no memory, no random init), then allocate the real
    # storage once: every parameter is about to be overwritten by the checkpoint anyway.
    with torch.device("meta"):
        model = CausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    model.rotary.to(device, dtype)
    load_weights(model, model_path)
    return model.eval()


__all__ = ["CausalLM", "ModelConfig", "check_tensor_parallel", "load_model", "load_weights"]
