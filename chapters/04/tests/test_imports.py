"""Only the schedulers load torch: the API server and the tokenizer processes never import it, at any TP size."""

import subprocess
import sys
from pathlib import Path

import pytest

TORCH_FREE = ["minisgl.core", "minisgl.config", "minisgl.process", "minisgl.messages", "minisgl.server.api",
              "minisgl.server.launch", "minisgl.server.frontend", "minisgl.tokenizer.worker"]


def modules_after_importing(root: Path, modules: list[str]) -> set[str]:
    """The names in sys.modules of a fresh interpreter that imported ``modules`` from ``root``."""
    code = f"import sys; sys.path.insert(0, {str(root)!r})\n"
    code += "".join(f"import {name}\n" for name in modules) + "print('\\n'.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


@pytest.mark.parametrize("module", TORCH_FREE)
def test_a_module_of_the_torch_free_processes_imports_no_torch(request, module):
    loaded = modules_after_importing(request.config.minisgl_root, [module])
    assert module in loaded  # the check ran on the module named
    heavy = sorted(name for name in loaded if name == "torch" or name.startswith(("torch.", "minisgl.models"))
                   or name == "transformers.modeling_utils" or ".modeling_" in name)
    assert not heavy, f"importing {module} loads {heavy[:5]}"


def test_the_check_sees_torch_where_it_is_loaded(request):
    assert "torch" in modules_after_importing(request.config.minisgl_root, ["minisgl.scheduler.worker"])


@pytest.mark.skipif(sys.platform != "linux", reason="reads process memory maps from Linux's /proc")
def test_only_the_scheduler_processes_map_libtorch(server):
    import httpx

    reply = httpx.post(server.url + "/v1/completions", json={"prompt": "One, two,", "max_tokens": 2}, timeout=120)
    assert reply.status_code == 200  # every process has done real work
    maps_torch = {}
    for pid in [server.process.pid, *server.descendants()]:
        name = Path(f"/proc/{pid}/cmdline").read_text().split("\0")[0]
        maps_torch[name] = "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    schedulers = {name: maps_torch.pop(name) for name in list(maps_torch) if name.startswith("minisgl-scheduler")}
    assert schedulers == {f"minisgl-scheduler-{rank}": True for rank in range(3)}  # the server runs --tp-size 3
    assert "minisgl-detokenizer" in maps_torch and not any(maps_torch.values()), maps_torch
