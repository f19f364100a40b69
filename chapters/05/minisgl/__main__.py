"""``python -m minisgl``: launch the OpenAI-compatible server (introduced in chapter 01).

    python -m minisgl --model-path ~/.cache/minisgl/models/SmolLM2-135M-Instruct --port 1919
"""

import logging
import sys

from .args import parse_args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .server.launch import serve  # after logging is set up, so that start-up is logged

    try:
        return serve(args)
    except (ValueError, KeyError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down cleanly
        return 130


if __name__ == "__main__":
    sys.exit(main())
