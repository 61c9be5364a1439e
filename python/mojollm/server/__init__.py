"""`mojollm serve`: an OpenAI-compatible HTTP server over one LLM.

    engine_loop.py  the thread that owns the engine; requests reach it as commands
    app.py          the FastAPI routes (OpenAI wire format in protocol.py)
    metrics.py      Prometheus metrics, vLLM's names under `mojollm:`

`serve()` binds the socket first (a busy port is an error before anything loads), answers
/health with 503 while the model loads on the engine thread, and on SIGINT/SIGTERM stops
accepting, lets in-flight requests finish for up to `shutdown_timeout` seconds, aborts the rest,
and returns (exit 0).
"""

from __future__ import annotations

import logging
import signal
import socket
from pathlib import Path
from typing import Callable

from mojollm.errors import MojollmError


def default_model_name(model) -> str:
    """The name a model is served under: its file name without .gguf, or its directory's name."""
    if model is None:
        from mojollm.model_store import default_model_file

        model = default_model_file()
    path = Path(str(model))
    return path.name[:-5] if path.name.lower().endswith(".gguf") else path.name


def serve(load_llm: Callable[[], object], model_name: str, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_queue: int | None = 256, max_body_size: int | None = None,
          shutdown_timeout: float = 30.0, log_level: str = "info", on_listening=None) -> None:
    """Serve until SIGINT/SIGTERM; raises MojollmError if the port cannot be bound or the model
    fails to load. `on_listening(url)` is called once the socket is bound."""
    import uvicorn

    from mojollm.server.app import DEFAULT_MAX_BODY_SIZE, create_app
    from mojollm.server.engine_loop import EngineLoop
    from mojollm.server.metrics import ServerMetrics

    log = logging.getLogger("mojollm.server")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise MojollmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    bound_port = sock.getsockname()[1]

    server_box: list = []

    def fatal(message: str) -> None:  # on the engine thread: the model did not load
        if server_box:
            server_box[0].should_exit = True

    metrics = ServerMetrics(model_name)
    loop = EngineLoop(load_llm, metrics, max_waiting=max_queue, on_fatal=fatal)
    app = create_app(loop, model_name, metrics, api_key=api_key,
                     max_body_size=DEFAULT_MAX_BODY_SIZE if max_body_size is None else max_body_size)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout)
    server = uvicorn.Server(config)
    server_box.append(server)
    # uvicorn re-raises the signal that stopped it once it has shut down; with these handlers in
    # place beforehand (it restores them), that re-raise is a no-op and the process exits 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if on_listening is not None:
            shown = f"[{host}]" if family == socket.AF_INET6 else host
            on_listening(f"http://{shown}:{bound_port}")
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    if loop.load_error:
        raise MojollmError(loop.load_error)
