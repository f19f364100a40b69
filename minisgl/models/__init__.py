"""Models: configuration, the decoder and weight loading (introduced in chapter 01).

Importing the package loads no torch (since chapter 06): the launcher, in the API server's process,
reads a checkpoint's ``config.json`` with ``ModelConfig`` (``config.py``, plain Python), and that process
never runs the model. The decoder and the weight loader, which need torch, are imported when first used:
by ``load_model``, or as ``minisgl.models.CausalLM`` and ``minisgl.models.load_weights``.
"""

from pathlib import Path
from typing import TYPE_CHECKING

from .config import ModelConfig, check_tensor_parallel

if TYPE_CHECKING:
    import torch

    from .decoder import CausalLM


def load_model(model_path: str | Path, dtype: "torch.dtype | None" = None, device="cpu") -> "CausalLM":
    """Build the model for ``model_path``'s config and fill it with the checkpoint's weights (in ``dtype``,
    float32 by default): this rank's share of them, under tensor parallelism (``distributed.tp_info()``)."""
    import torch

    from ..distributed import tp_info
    from .decoder import CausalLM
    from .weights import load_weights

    dtype = dtype or torch.float32
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


def __getattr__(name: str):
    """``CausalLM`` and ``load_weights``, imported on first use: they import torch."""
    if name == "CausalLM":
        from .decoder import CausalLM

        return CausalLM
    if name == "load_weights":
        from .weights import load_weights

        return load_weights
    raise AttributeError(f"module 'minisgl.models' has no attribute {name!r}")


__all__ = ["CausalLM", "ModelConfig", "check_tensor_parallel", "load_model", "load_weights"]
