"""The engine's HTTP server: one FastAPI app, served by uvicorn in a daemon thread.

Bound to 127.0.0.1 (the Unix socket's owner-only rule, by other means: every request must
carry the API key derived from the engine's token, engine/http/auth.py). The port is bound
before the thread starts, so a port in use is reported at once; the daemon then runs on
without HTTP rather than failing. Errors of every route, validation included, are the API's
own error objects ({"error": {"message", "type", "param", "code"}}).
"""

from __future__ import annotations

import socket
import threading

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.http.auth import api_key, key_ok, presented_key
from engine.http.openai_serving import ApiError, OpenAIServing

DEFAULT_HOST = "127.0.0.1"


def require_key(request: Request) -> None:
    presented = presented_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
    if not key_ok(presented, request.app.state.api_key):
        raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY` (or `X-API-Key: KEY`) "
                       "with the api_key of `clora-tui engine status --json`", "authentication_error",
                       "invalid_api_key")


def build_app(engine, key: str) -> FastAPI:
    from engine.http import openai_routes
    from engine.tinker import routes as tinker_routes
    from engine.tinker.futures import TinkerError
    from engine.tinker.service import TinkerService

    app = FastAPI(title="clora engine", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.api_key = engine, key
    app.state.openai = OpenAIServing(engine)
    app.state.tinker = TinkerService(engine)
    app.include_router(openai_routes.router, dependencies=[Depends(require_key)])
    app.include_router(tinker_routes.router, dependencies=[Depends(require_key)])
    app.add_exception_handler(TinkerError, tinker_routes.tinker_error)

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        param = ".".join(str(p) for p in first[1:]) or None
        return JSONResponse(ApiError(400, problems, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def crashed(_request, exc: Exception):
        return JSONResponse(ApiError(500, f"{type(exc).__name__}: {exc}", "server_error").body(), status_code=500)

    return app


class HttpServer:
    """The app on host:port, in a thread of the engine process."""

    def __init__(self, engine, token: str, port: int, host: str = DEFAULT_HOST):
        self.engine, self.host, self.port = engine, host, port
        self.api_key = api_key(token)
        self.server = None
        self.thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"

    def start(self) -> None:
        """Bind (raises OSError if the port is taken), then serve in a thread."""
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(build_app(self.engine, self.api_key), log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="clora-http",
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=5)
