"""Loading a Hugging Face safetensors checkpoint into our model (introduced in chapter 01).

A checkpoint is a folder with ``model.safetensors``, or with several shards listed by
``model.safetensors.index.json``. Our module names differ from the checkpoint's, and we fuse q/k/v
into one matrix and gate/up into another, so loading is driven by one table: for every checkpoint
tensor the model needs, the part of it this rank keeps and the slice of our parameter it fills
(``checkpoint_layout``, a ``Shard`` per tensor, asked of the layers that hold them). A tensor the
table names but the checkpoint lacks is an error; a tensor the checkpoint has but the table does not
name (a tied ``lm_head``, say) is ignored.

Under tensor parallelism every rank reads the checkpoint itself and cuts each tensor as it reads it:
one whole tensor at a time passes through memory, and no rank ever holds the whole model.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..layers import Shard, whole
from .decoder import CausalLM


# --8<-- [start:checkpoint-layout]
def checkpoint_layout(model: CausalLM) -> dict[str, Shard]:
    """Checkpoint tensor name -> what this rank keeps of it, and where."""
    layout = {"model.embed_tokens.weight": model.embed.shard(), "model.norm.weight": whole(model.norm.weight)}
    if model.lm_head is not None:
        layout["lm_head.weight"] = model.lm_head.shard()
    for i, layer in enumerate(model.layers):
        prefix, attn = f"model.layers.{i}.", layer.attn
        for part in ("weight", "bias"):
            if getattr(attn.qkv, part) is not None:
                for index, name in enumerate("qkv"):
                    layout[f"{prefix}self_attn.{name}_proj.{part}"] = attn.qkv.shard(part, index)
        layout[f"{prefix}self_attn.o_proj.weight"] = attn.o.shard("weight")
        if attn.o.bias is not None:
            layout[f"{prefix}self_attn.o_proj.bias"] = attn.o.shard("bias")
        if attn.q_norm is not None:
            layout[f"{prefix}self_attn.q_norm.weight"] = whole(attn.q_norm.weight)
            layout[f"{prefix}self_attn.k_norm.weight"] = whole(attn.k_norm.weight)
        layout[f"{prefix}mlp.gate_proj.weight"] = layer.mlp.gate_up.shard("weight", 0)
        layout[f"{prefix}mlp.up_proj.weight"] = layer.mlp.gate_up.shard("weight", 1)
        layout[f"{prefix}mlp.down_proj.weight"] = layer.mlp.down.shard("weight")
        layout[f"{prefix}input_layernorm.weight"] = whole(layer.input_norm.weight)
        layout[f"{prefix}post_attention_layernorm.weight"] = whole(layer.post_attn_norm.weight)
    return layout
# --8<-- [end:checkpoint-layout]


def checkpoint_files(model_path: str | Path) -> dict[str, Path]:
    """Every tensor name in the checkpoint -> the safetensors file that holds it."""
    model_path = Path(model_path)
    index_file, single_file = model_path / "model.safetensors.index.json", model_path / "model.safetensors"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        files = {name: model_path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise FileNotFoundError(f"weight shard {shard.name} listed in {index_file} does not exist")
        return files
    if single_file.is_file():
        with safe_open(single_file, framework="pt") as f:
            return {name: single_file for name in f.keys()}
    raise FileNotFoundError(f"no weights in {model_path}: expected model.safetensors or model.safetensors.index.json")


# --8<-- [start:load-weights]
def load_weights(model: CausalLM, model_path: str | Path) -> None:
    layout, files = checkpoint_layout(model), checkpoint_files(model_path)
    missing = [name for name in layout if name not in files]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise KeyError(f"checkpoint {model_path} is missing tensor(s) the model needs: {shown}")
    by_file: dict[Path, list[str]] = {}
    for name in layout:
        by_file.setdefault(files[name], []).append(name)
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in names:
                    tensor, shard = f.get_tensor(name), layout[name]
                    if tuple(tensor.shape) != shard.full_shape:
                        raise ValueError(
                            f"tensor {name} in {file.name} has shape {tuple(tensor.shape)}, "
                            f"the model expects {shard.full_shape}"
                        )
                    shard.load(tensor)  # this rank's part only; the whole tensor is dropped next
# --8<-- [end:load-weights]
