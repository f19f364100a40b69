"""The engine runs one batch through the model and samples each request's next token (introduced in chapter 02).

It owns what lives on the device: the model's weights and the KV cache. It knows nothing of queues,
HTTP or text; the scheduler decides *which* requests run, the engine only runs them.
"""

from pathlib import Path

import torch

from ..batch import Batch
from ..models import load_model
from ..sampling import sample


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` picks bfloat16 where the hardware computes it fast, else float32 (float16 on old GPUs)."""
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    fast_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if fast_bf16 else torch.float32


class Engine:
    def __init__(self, model_path: str | Path, dtype: str, device: str, num_slots: int, context_length: int | None):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = load_model(model_path, self.dtype, self.device)
        self.config = self.model.config
        # A slot holds a whole sequence: prompt and reply together may not be longer than this.
        self.context_length = min(context_length or self.config.max_position_embeddings, self.config.max_position_embeddings)
        self.kv_cache = self.model.new_kv_cache(num_slots, self.context_length)

    # --8<-- [start:engine-step]
    @torch.inference_mode()
    def step(self, requests: list, is_prefill: bool) -> list[int]:
        """Run the uncached tokens of ``requests`` and return the next token of each."""
        batch = Batch.build(is_prefill, requests, self.device)
        hidden = self.model(batch, self.kv_cache)
        logits = self.model.logits(hidden[batch.last_token])  # only each request's last token is sampled
        return sample(logits, [r.params for r in requests], [r.generator for r in requests])
    # --8<-- [end:engine-step]
