"""Serving the app over HTTP: `GuardedH11Protocol` (uvicorn's h11 protocol with connection limits and idle and
header timeouts), the listening socket (`listen`), uvicorn (`uvicorn_server`) and `run_server`, what
`captune serve` runs."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections import Counter
from http import HTTPStatus
from pathlib import Path
from typing import Any, ClassVar

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from captune.errors import CaptuneError
from captune.serve.app import create_app
from captune.serve.schemas import ErrorDetail, ErrorResponse
from captune.serve.settings import GRACEFUL_SHUTDOWN_S, ServeSettings, check_settings

log = logging.getLogger(__name__)


def _raw_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole error answer in the API's JSON shape, for the protocol to write where no request (or no app) is
    there to answer: the connection is closed after it."""
    body = ErrorResponse(error=ErrorDetail(code=code, message=message)).model_dump_json().encode()
    fields = {"content-type": "application/json", "content-length": str(len(body)), "connection": "close"}
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    lines += [f"{name}: {value}" for name, value in (fields | (headers or {})).items()]
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the limits it leaves out, so that no client can hold the server's
    connections (`guarded_protocol` makes one class per server, with its settings and per-client counts):

    - connection limits, checked as a connection opens, in all (`max_connections`) and per client IP
      (`max_connections_per_client`): beyond them 503 and closed at once. uvicorn's `limit_concurrency` refuses only
      once a request's headers have come, in plain text, and counts no client.
    - the idle timeout (`idle_timeout_s`) from the moment a connection opens: uvicorn starts its keep-alive timer
      only after an answer, so a connection that never sends a byte stayed open for good.
    - a header timeout (`header_timeout_s`): from the first byte of a request to the end of its headers, 408 and
      closed beyond. The body's timeout is the app's (`_limited`), which answers in the same JSON shape.
    - a request h11 cannot parse gets uvicorn's 400 in the API's JSON shape instead of plain text.
    """

    limits: ClassVar[ServeSettings]
    clients: ClassVar[Counter[str]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.idle_timeout_s  # type: ignore[assignment]  # uvicorn's is whole seconds
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_cycle: object = None

    @property
    def _host(self) -> str:
        return self.client[0] if self.client else ""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.clients[self._host] += 1
        refusal = self._refusal()
        if refusal:
            log.warning("refused a connection from %s: %s", self._host, refusal)
            retry = {"retry-after": str(self.limits.retry_after_s)}
            transport.write(_raw_error(503, "too_many_connections", refusal, retry))
            transport.close()
            return
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def _refusal(self) -> str | None:
        limits, retry = self.limits, f"retry after {self.limits.retry_after_s} s"
        if len(self.connections) > limits.max_connections:
            return f"the server is at its limit of {limits.max_connections} connections (--max-connections); {retry}"
        if self.clients[self._host] > limits.max_connections_per_client:
            return (f"the server is at its limit of {limits.max_connections_per_client} connections from {self._host} "
                    f"(--max-connections-per-client); close one of yours, or {retry}")  # fmt: skip
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.clients[self._host] -= 1
        if not self.clients[self._host]:
            del self.clients[self._host]
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if self._header_timer is None and (cycle is None or cycle.response_complete):  # a request's first bytes
            self._header_cycle = cycle
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timed_out)
        super().data_received(data)
        if self.cycle is not cycle:  # its headers came
            self._stop_header_timer()

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.cycle is not self._header_cycle or self.transport.is_closing():
            return  # the headers came (read from a pipelined buffer), or the connection went
        if self.conn.our_state is h11.IDLE:  # else an answer was sent and the rest of its body is being dropped
            message = (f"the request's headers did not all come within {self.limits.header_timeout_s:g} s "
                       "(--header-timeout-s); send them at once")  # fmt: skip
            self.transport.write(_raw_error(408, "header_timeout", message))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        message = f"not a valid HTTP/1.1 request ({msg.rstrip('.')}), or its headers are over 16 KiB"
        self.transport.write(_raw_error(400, "invalid_http", message))
        self.transport.close()


def guarded_protocol(settings: ServeSettings) -> type[GuardedH11Protocol]:
    """The protocol class of one server: its limits, and its own count of connections per client."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": settings, "clients": Counter()})


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, made before the model loads so that a bad or busy address fails at once
    (uvicorn would bind only after the model is loaded, and answer a port out of range with a traceback). One
    address, as uvicorn binds its own with `--workers`: IPv6 when the host has a colon.

    Raises:
        CaptuneError: a port outside 1-65535, a host that does not resolve, or an address that cannot be bound.
    """
    if not 1 <= port <= 65535:
        raise CaptuneError(f"--port {port}: not a TCP port; give one from 1 to 65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as err:  # socket.gaierror for a host that does not resolve
        raise CaptuneError(f"cannot listen on --host {host} --port {port}: {err.strerror or err}; give a free port "
                           "and an address of this machine") from None  # fmt: skip


def uvicorn_server(app: FastAPI, settings: ServeSettings, log_level: str = "info") -> uvicorn.Server:
    """uvicorn serving `app` with `GuardedH11Protocol` (the settings' timeouts and connection limits), to run on a
    socket from `listen`."""
    config = uvicorn.Config(app, http=guarded_protocol(settings), log_level=log_level,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)  # fmt: skip
    return uvicorn.Server(config)


def run_server(model_dir: str | Path | None, host: str = "127.0.0.1", port: int = 8000,
               settings: ServeSettings | None = None, *, vqa_model_dir: str | Path | None = None,
               index_dir: str | Path | None = None, retrieval_model_dir: str | None = None,
               api: bool = True) -> None:  # fmt: skip
    """Serves `create_app(model_dir, settings, vqa_model_dir=..., index_dir=..., retrieval_model_dir=..., api=...)`
    with uvicorn until SIGTERM or Ctrl-C, then lets the requests in flight finish (up to `GRACEFUL_SHUTDOWN_S`) and
    returns."""
    settings = settings or ServeSettings()
    check_settings(settings)
    listening = listen(host, port)
    app = create_app(model_dir, settings, vqa_model_dir=vqa_model_dir, index_dir=index_dir,
                     retrieval_model_dir=retrieval_model_dir, api=api)  # fmt: skip
    server = uvicorn_server(app, settings)
    where = f"http://{host}:{port}"
    routes = " ; API POST /v1/captions, /v1/answers, /v1/search ; OpenAPI /openapi.json"
    log.info("web app %s/%s", where, routes if api else "")
    # uvicorn shuts down gracefully on the signal, then raises it again for the handler it found: a no-op for SIGTERM
    # and a caught KeyboardInterrupt for Ctrl-C make that a normal return.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[listening])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
