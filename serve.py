"""HTTP server for a trained checkpoint: multipart, JSON and OpenAI-compatible endpoints.

    export LLM_CHECKPOINT=checkpoints/vision_trained_model.pt
    python serve.py                      # http://127.0.0.1:8000, docs/api.md lists the endpoints
    python serve.py --reload             # restart on code changes (what `make serve-dev` runs)

Every flag has an environment variable (python serve.py --help). The port opens at once; the
model loads in the background and /health answers 503 until it is ready. A missing or broken
checkpoint stops start-up with one message. This file only turns flags and environment into
settings and runs uvicorn; the app is the server/ package (server/app.py), whose requests go
through engine.Engine, which decodes concurrent requests together in one batch.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from pathlib import Path

import checkpoint
from errors import UserError, cli
from server.app import create_app
from server.connection import BoundedHttp
from server.settings import OPTIONS, Settings, build_parser, settings_from

HERE = Path(__file__).resolve().parent
# uvicorn options of both ways to run (with and without --reload): our connection class bounds the
# request headers' bytes and time (server/connection.py); a stuck request may delay exit 3 s.
UVICORN = {"http": BoundedHttp, "timeout_graceful_shutdown": 3}
__all__ = [                         # what tests and tools import from here
    "create_app", "build_parser", "settings_from", "main", "app_from_env", "UserError"]


def app_from_env():
    """Factory for `--reload` (uvicorn imports this module again in a worker process)."""
    settings = settings_from()
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:  %(name)s %(message)s")
    return create_app(settings)


def read_checkpoint(settings: Settings) -> dict:
    """The checkpoint file, checked before the port opens. Errors say how to get a model."""
    try:
        return checkpoint.read_file(settings.checkpoint)
    except UserError as e:
        hint = "" if "python train_vision.py" in str(e) else "训练一个模型：python train_vision.py；"
        raise UserError(f"{e}（{hint}用 LLM_CHECKPOINT=路径 或 --checkpoint 路径 指定模型文件。）") from None


def check_port(host: str, port: int):
    """A busy port is one clear line before anything starts (uvicorn would log an English error
    and the loading thread would then abort the process)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise UserError(f"无法监听 {host}:{port}：{e.strerror}。请检查 --host / SERVE_HOST。") from None
            raise UserError(f"端口 {port} 已被占用（可能另一个服务还在运行）。用 --port {port + 1}（或 SERVE_PORT={port + 1}）"
                            f"换一个端口，或先停掉占用它的程序。") from None


@cli
def main(argv=None):
    import uvicorn
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    from trainer import resolve_device
    resolve_device(settings.device)                   # a bad --device fails here, not in the background
    obj = read_checkpoint(settings)
    check_port(settings.host, settings.port)
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:  %(name)s %(message)s")
    if args.reload:
        del obj
        logging.getLogger("watchfiles").setLevel(logging.WARNING)    # no line for every file saved
        for name, env, kind, _, _ in OPTIONS:           # the worker process reads its settings from here
            value = getattr(settings, name)
            os.environ[env] = ("1" if value else "") if kind is bool else str(value)
        uvicorn.run("serve:app_from_env", factory=True, host=settings.host, port=settings.port, reload=True,
                    reload_dirs=[str(HERE)], reload_includes=["*.py"], log_level=settings.log_level,
                    reload_excludes=[".venv", "data", "checkpoints", "web", "tests"], **UVICORN)
        return
    app = create_app(settings, obj)
    http_server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                                **UVICORN))
    app.state.server.on_fatal = lambda: setattr(http_server, "should_exit", True)
    http_server.run()
    if app.state.server.failed:
        sys.exit(2)


if __name__ == "__main__":
    main()
