"""``python -m minisgl "prompt"``: stream a reply from the model (introduced in chapter 01)."""

import argparse
import sys
import time

from .default_model import default_model_path, require_default_model
from .generate import Generator
from .sampling import SamplingParams


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m minisgl", description="Stream a reply from a language model.")
    parser.add_argument("prompt", help="what to ask (or, with --raw, the text to continue)")
    parser.add_argument("--model-path", default=None, help=f"a Hugging Face model folder (default: {default_model_path()})")
    parser.add_argument("--max-tokens", type=int, default=256, help="most new tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold, in (0, 1]")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--seed", type=int, default=None, help="make sampling repeatable")
    parser.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--raw", action="store_true", help="continue the prompt as plain text, without the chat template")
    parser.add_argument("--system", default=None, help="a system message for the chat template")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed, args.max_tokens, args.stop)
        generator = Generator(args.model_path or require_default_model(), args.dtype, args.device)
        prompt_ids = generator.encode(args.prompt, chat=not args.raw, system=args.system)
        started, generated = time.perf_counter(), 0
        for delta in generator.stream(prompt_ids, params):
            print(delta.text, end="", flush=True)
            generated += len(delta.token_ids)
    except (ValueError, KeyError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - started
    print(
        f"\n[{generated} tokens in {elapsed:.1f}s, {generated / elapsed:.1f} tok/s, "
        f"{generator.dtype}, finish: {delta.finish_reason}]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
