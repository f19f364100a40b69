"""``python -m minisgl``: launch the OpenAI-compatible server (introduced in chapter 01), or with
``--shell`` chat in the terminal (chapter 06).

    python -m minisgl --model-path ~/.cache/minisgl/models/SmolLM2-135M-Instruct --port 1919
    python -m minisgl --shell
"""

import logging
import sys

from .args import parse_args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.shell:
            return shell(args)
        from .server.launch import serve  # after logging is set up, so that start-up is logged

        return serve(args)
    except (ValueError, KeyError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down cleanly
        return 130


def shell(args) -> int:
    from dataclasses import asdict

    from .core import SamplingParams
    from .llm import LLM
    from .shell import run_shell

    logging.getLogger().setLevel(logging.WARNING)  # the terminal is for the conversation
    options = {k: v for k, v in asdict(args).items() if k not in ("model_path", "shell")}
    llm = LLM(args.model_path, **options)
    return run_shell(llm, SamplingParams(max_tokens=None))  # greedy, as long as the context allows


if __name__ == "__main__":
    sys.exit(main())
