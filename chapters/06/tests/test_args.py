"""The complete server's command line (DESIGN.md section 5): every flag there parses to its setting; and the
launcher's reading of a model folder against it (``resolve_config``)."""

import json

import pytest

from minisgl.args import overlap_schedule, parse_args


def test_max_prefill_length_is_the_chunked_prefill_size():
    """mini-sglang's name for the prompt tokens of one step; SGLang's is --chunked-prefill-size."""
    assert parse_args(["--max-prefill-length", "64"]).chunked_prefill_size == 64
    assert parse_args(["--chunked-prefill-size", "96"]).chunked_prefill_size == 96


@pytest.mark.parametrize("flags, field, value", [
    (["--attention-backend", "triton"], "attention_backend", "triton"),
    (["--cuda-graph-max-bs", "8"], "cuda_graph_max_bs", 8),
    (["--disable-cuda-graph"], "disable_cuda_graph", True),
    (["--shell"], "shell", True),
    (["--kv-cache-memory", "256"], "kv_cache_memory", 256),
    (["--max-request-bytes", "4096"], "max_request_bytes", 4096),
])
def test_chapter_06_flags(flags, field, value):
    assert getattr(parse_args(flags), field) == value


@pytest.mark.parametrize("flags, device, overlap", [
    ([], "cuda", True), ([], "cpu", False),  # on where it pays: a GPU (chapter 06 measures a CPU slower)
    (["--disable-overlap-schedule"], "cuda", False), (["--enable-overlap-schedule"], "cpu", True),
])
def test_overlap_scheduling_is_on_by_default_on_a_gpu_only(flags, device, overlap):
    assert overlap_schedule(parse_args(flags), device) is overlap


def test_overlap_cannot_be_both_on_and_off(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--enable-overlap-schedule", "--disable-overlap-schedule"])
    assert "not both" in capsys.readouterr().err


def test_a_backend_that_does_not_exist_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--attention-backend", "cuda"])
    assert "invalid choice" in capsys.readouterr().err


def test_the_launcher_reads_config_json_with_the_models_own_reader(tmp_path):
    """One reader of config.json (``ModelConfig``): a model minisgl cannot run, or cannot split over --tp-size
    ranks, is refused before any process starts; which tokens end a reply is the launcher's one set."""
    from minisgl.config import resolve_config

    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "eos_token_id": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    resolved = resolve_config(parse_args(["--model-path", str(tmp_path), "--context-length", "512"]))
    assert (resolved.vocab_size, resolved.context_length, resolved.eos_token_ids) == (100, 256, (2, 7))
    with pytest.raises(ValueError, match=r"--tp-size 3 does not divide the model's 4 attention heads.*\(1, 2, 4\)"):
        resolve_config(parse_args(["--model-path", str(tmp_path), "--tp-size", "3"]))
    (tmp_path / "config.json").write_text(json.dumps(config | {"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        resolve_config(parse_args(["--model-path", str(tmp_path)]))


# ---------------------------------------------------------------- --dp-size: replicas behind SGLang's Model Gateway


def pretend_the_gateway_is_installed(monkeypatch, installed: bool) -> None:
    """``--dp-size`` > 1 checks that sglang_router can be imported: answer for it, whatever this machine has."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: (object() if installed else None) if name == "sglang_router" else
                        real(name, *rest))


@pytest.fixture
def gateway_installed(monkeypatch):
    pretend_the_gateway_is_installed(monkeypatch, True)


def test_dp_size_and_the_router_policy_parse(gateway_installed):
    assert (parse_args([]).dp_size, parse_args([]).router_policy) == (1, "cache_aware")
    args = parse_args(["--dp-size", "3", "--router-policy", "round_robin"])
    assert (args.dp_size, args.router_policy) == (3, "round_robin")


@pytest.mark.parametrize("flags, words", [
    (["--dp-size", "0"], "--dp-size must be positive"),
    (["--dp-size", "2", "--router-policy", "fastest"], "invalid choice"),
    (["--router-policy", "round_robin"], "needs --dp-size 2 or more"),  # nothing to pick among: not ignored
    (["--dp-size", "2", "--shell"], "not with --shell or --nnodes"),
])
def test_dp_size_mistakes_are_refused(gateway_installed, capsys, flags, words):
    with pytest.raises(SystemExit):
        parse_args(flags)
    assert words in capsys.readouterr().err


def test_dp_size_without_the_gateway_installed_says_how_to_install_it(monkeypatch, capsys):
    pretend_the_gateway_is_installed(monkeypatch, False)
    with pytest.raises(SystemExit):
        parse_args(["--dp-size", "2"])
    assert "pip install sglang-router" in capsys.readouterr().err
    assert parse_args(["--dp-size", "1"]).dp_size == 1  # one server needs no gateway


def test_each_replica_runs_with_the_launchers_options_on_a_port_of_its_own(gateway_installed):
    from minisgl.args import to_argv
    from minisgl.server.replicas import replica_command

    flags = ["--dtype", "float32", "--page-size", "32", "--api-key", "k", "--disable-cuda-graph", "--host", "0.0.0.0",
             "--port", "8000", "--dp-size", "2", "--router-policy", "random"]
    args = parse_args(flags)
    assert parse_args(to_argv(args)) == args  # to_argv is parse_args' inverse
    command = replica_command(args, 5000)
    assert command[1:3] == ["-m", "minisgl"]
    replica = parse_args(command[3:])  # on 127.0.0.1 (behind the gateway), alone, and otherwise alike
    assert (replica.host, replica.port, replica.dp_size, replica.router_policy) == ("127.0.0.1", 5000, 1, "cache_aware")
    assert replica == parse_args(["--dtype", "float32", "--page-size", "32", "--api-key", "k", "--disable-cuda-graph",
                                  "--port", "5000"])
