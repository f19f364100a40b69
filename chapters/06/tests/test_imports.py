"""Only the schedulers load torch (and triton): the API server and the tokenizer processes never import them,
not even through the package's ``LLM`` (loaded on first use), and the page allocator and the radix prefix
cache are plain Python (the scheduler's bookkeeping, not the model's)."""

import subprocess
import sys
from pathlib import Path

import pytest

TORCH_FREE = ["minisgl", "minisgl.core", "minisgl.config", "minisgl.process", "minisgl.messages", "minisgl.server.api",
              "minisgl.server.launch", "minisgl.server.frontend", "minisgl.tokenizer.worker",
              "minisgl.models.config"]  # the launcher reads config.json with the model's own reader
# The package minisgl.scheduler imports the scheduler loop, hence the engine and torch, in its __init__: these
# modules of it are imported with that __init__ left out (a bare package stands in for it).
TORCH_FREE_IN_SCHEDULER = ["minisgl.scheduler.pages", "minisgl.scheduler.radix"]


def modules_after_importing(root: Path, modules: list[str], skip_package_init: str | None = None) -> set[str]:
    """The names in sys.modules of a fresh interpreter that imported ``modules`` from ``root``; with
    ``skip_package_init``, that package's ``__init__.py`` is not run (its modules are found by their files)."""
    code = f"import sys; sys.path.insert(0, {str(root)!r})\n"
    if skip_package_init:
        folder = root.joinpath(*skip_package_init.split("."))
        code += (f"import types; package = types.ModuleType({skip_package_init!r}); "
                 f"package.__path__ = [{str(folder)!r}]; sys.modules[{skip_package_init!r}] = package\n")
    code += "".join(f"import {name}\n" for name in modules) + "print('\\n'.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def heavy_modules(loaded: set[str]) -> list[str]:
    return sorted(name for name in loaded if name in ("torch", "triton")
                  or name.startswith(("torch.", "triton.", "minisgl.models.decoder", "minisgl.models.weights",
                                      "minisgl.kernels", "minisgl.layers", "minisgl.engine"))
                  or name == "transformers.modeling_utils" or ".modeling_" in name)


@pytest.mark.parametrize("module", TORCH_FREE)
def test_a_module_of_the_torch_free_processes_imports_no_torch(request, module):
    loaded = modules_after_importing(request.config.minisgl_root, [module])
    assert module in loaded  # the check ran on the module named
    heavy = heavy_modules(loaded)
    assert not heavy, f"importing {module} loads {heavy[:5]}"


@pytest.mark.parametrize("module", TORCH_FREE_IN_SCHEDULER)
def test_the_page_allocator_and_the_radix_cache_import_no_torch(request, module):
    loaded = modules_after_importing(request.config.minisgl_root, [module], skip_package_init="minisgl.scheduler")
    assert module in loaded and "minisgl.scheduler.scheduler" not in loaded  # the module, not the package's loop
    heavy = heavy_modules(loaded)
    assert not heavy, f"importing {module} loads {heavy[:5]}"


def test_the_check_sees_torch_where_it_is_loaded(request):
    root = request.config.minisgl_root
    assert "torch" in modules_after_importing(root, ["minisgl.scheduler.worker"])
    # and with the scheduler package's __init__ left out, its loop still pulls torch in (through the engine)
    loop = modules_after_importing(root, ["minisgl.scheduler.scheduler"], skip_package_init="minisgl.scheduler")
    assert "torch" in loop


@pytest.mark.skipif(sys.platform != "linux", reason="reads process memory maps from Linux's /proc")
def test_only_the_scheduler_process_maps_libtorch(server):
    import httpx

    reply = httpx.post(server.url + "/v1/completions", json={"prompt": "One, two,", "max_tokens": 2}, timeout=120)
    assert reply.status_code == 200  # every process has done real work
    maps_torch = {}
    for pid in [server.process.pid, *server.descendants()]:
        name = Path(f"/proc/{pid}/cmdline").read_text().split("\0")[0]
        maps_torch[name] = "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    schedulers = {name: maps_torch.pop(name) for name in list(maps_torch) if name.startswith("minisgl-scheduler")}
    assert schedulers == {"minisgl-scheduler": True}  # the server runs at TP 1
    assert "minisgl-detokenizer" in maps_torch and not any(maps_torch.values()), maps_torch
