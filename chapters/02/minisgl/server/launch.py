"""Start the engine and the HTTP server in one process (introduced in chapter 02).

The scheduler loop runs on a background thread; uvicorn serves the FastAPI app on the main thread (or,
in a notebook, on a second background thread). Both share the ``Scheduler`` object: HTTP handlers call its
thread-safe ``submit``/``abort``, and everything else happens on the scheduler's thread.
"""

import logging
import socket
import threading

import uvicorn
from transformers import AutoTokenizer

from ..args import ServerArgs
from ..engine import Engine
from ..models import resolve_model_path
from ..scheduler import Scheduler
from .api import create_app

logger = logging.getLogger(__name__)


# --8<-- [start:server]
class Server:
    def __init__(self, args: ServerArgs):
        self.args = args
        model_path = resolve_model_path(args.model_path)
        logger.info("loading %s", model_path)
        engine = Engine(model_path, args.dtype, args.device, args.max_running_requests, args.context_length)
        logger.info("model ready on %s in %s; KV cache %.0f MiB", engine.device, engine.dtype, _mib(engine))
        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.scheduler = Scheduler(engine, tokenizer, args.max_running_requests, args.max_prefill_length)
        self.stop_event = threading.Event()
        self.scheduler_thread = threading.Thread(
            target=self.scheduler.run_forever, args=(self.stop_event,), name="minisgl-scheduler", daemon=True
        )
        self.app = create_app(
            self.scheduler, tokenizer, args.model_name, self.scheduler_thread.is_alive, args.max_request_bytes
        )
        self.http: uvicorn.Server | None = None
        self.http_thread: threading.Thread | None = None

    def _bind(self, port: int) -> socket.socket:
        # Bound and listening before uvicorn starts: a client that connects early waits in the
        # backlog instead of being refused, so no one has to poll for readiness.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.args.host, port))
        sock.listen(128)
        return sock

    def serve_forever(self) -> None:
        """Serve until Ctrl-C or SIGTERM (uvicorn handles both), then stop the scheduler."""
        sock = self._bind(self.args.port)
        self.scheduler_thread.start()
        config = uvicorn.Config(self.app, log_level=self.args.log_level, timeout_graceful_shutdown=3)
        self.http = uvicorn.Server(config)
        # The port actually bound (--port 0 picks a free one): whoever started us reads the URL here.
        logger.info("serving %s at http://%s:%d", self.args.model_name, self.args.host, sock.getsockname()[1])
        try:
            self.http.run(sockets=[sock])
        finally:
            self.stop_event.set()
            self.scheduler_thread.join(timeout=10)
    # --8<-- [end:server]

    def start_in_background(self) -> str:
        """Serve on a free port from background threads; returns the base URL. For notebooks."""
        sock = self._bind(0)
        port = sock.getsockname()[1]
        self.scheduler_thread.start()
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=3)
        self.http = uvicorn.Server(config)
        self.http.install_signal_handlers = lambda: None  # not the main thread
        self.http_thread = threading.Thread(target=self.http.run, kwargs={"sockets": [sock]}, name="minisgl-http", daemon=True)
        self.http_thread.start()
        return f"http://{self.args.host}:{port}"

    def stop(self) -> None:
        if self.http is not None:
            self.http.should_exit = True
        if self.http_thread is not None:
            self.http_thread.join(timeout=10)
        self.stop_event.set()
        if self.scheduler_thread.is_alive():
            self.scheduler_thread.join(timeout=10)


def _mib(engine: Engine) -> float:
    cache = engine.kv_cache
    return 2 * cache.k.numel() * cache.k.element_size() / 2**20
