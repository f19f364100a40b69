"""Bad checkpoints fail with an error that names the problem."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from minisgl.models import load_model


@pytest.fixture
def llama(tmp_path_factory, make_tiny_checkpoint):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"), tie=False)


def test_unknown_architecture_is_named(llama, copy_checkpoint):
    folder = copy_checkpoint(llama)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_model(folder)


def test_unsupported_rotary_scaling_is_named(llama, copy_checkpoint):
    folder = copy_checkpoint(llama)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):
        load_model(folder)


def test_missing_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_missing_weight_file_is_named(llama, copy_checkpoint):
    folder = copy_checkpoint(llama)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="expected model.safetensors"):
        load_model(folder)


def test_missing_shard_is_named(tmp_path, make_tiny_checkpoint):
    folder = make_tiny_checkpoint("llama", tmp_path / "sharded", tie=False, max_shard_size="40KB")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_model(folder)


def test_missing_tensor_is_named(llama, copy_checkpoint):
    folder = copy_checkpoint(llama)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(folder)


def test_wrong_shape_is_named(llama, copy_checkpoint):
    folder = copy_checkpoint(llama)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.norm.weight .* shape \(3,\)"):
        load_model(folder)


@pytest.mark.parametrize(
    "setting, message", [({"mlp_bias": True}, "mlp_bias"), ({"use_sliding_window": True}, "use_sliding_window")]
)
def test_settings_we_do_not_implement_are_refused(llama, copy_checkpoint, setting, message):
    folder = copy_checkpoint(llama)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | setting))
    with pytest.raises(ValueError, match=message):
        load_model(folder)


def test_missing_tokenizer_is_named(llama):
    from minisgl.generate import Generator

    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        Generator(llama, dtype="float32", device="cpu")
