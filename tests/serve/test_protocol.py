"""A real uvicorn with captune's protocol: a bad or busy port refused before the model loads, graceful shutdown,
`captune serve` as a process, and the idle, header and body timeouts and the connection limits (127.0.0.1 only,
each bounded to a few seconds)."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx2
import pytest

from captune.cli import main
from captune.serve import ServeSettings

from .conftest import RED, _assert_healthy, _error, _files, _free_port, _uvicorn_in_thread, _wait_for


@pytest.mark.parametrize(
    ("port", "named"),
    [("99999", "--port 99999: not a TCP port"), ("-1", "--port -1: not a TCP port"), ("busy", "already in use")],
)
def test_a_bad_or_busy_port_is_refused_before_the_model_loads(model_dir: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch, port: str,
                                                              named: str) -> None:  # fmt: skip
    def no_model(*_: Any, **__: Any) -> None:
        raise AssertionError("the model was loaded before the address was checked")

    monkeypatch.setattr("captune.serve.protocol.create_app", no_model)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        given = str(taken.getsockname()[1]) if port == "busy" else port
        assert main(["serve", "--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", given]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_stopping_the_server_lets_requests_in_flight_finish(model_dir: Path) -> None:
    # A lone request waits 1.5 s in the batcher for company: the stop comes while it is in flight.
    slow = ServeSettings(device="cpu", max_batch=4, max_wait_ms=1500)
    with _uvicorn_in_thread(model_dir, slow) as (url, server), ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx2.post, f"{url}/v1/captions", files=_files(RED), timeout=30)
        _wait_for(lambda: httpx2.get(f"{url}/health").json()["pending_images"] == 1)
        server.should_exit = True  # what uvicorn's SIGTERM / SIGINT handler does
        response = in_flight.result(timeout=30)
    assert response.status_code == 200 and response.json()["timing"]["queue_ms"] >= 1000
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(f"{url}/health")


def test_captune_serve_process_answers_and_exits_cleanly_on_sigterm(model_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "captune.cli", "serve", "--model-dir", str(model_dir), "--port", str(port),
               "--device", "cpu", "--max-batch", "4", "--max-wait-ms", "1500"]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"}
        )
    try:
        _wait_for(lambda: _answers(f"{url}/health") or process.poll() is not None, timeout=90)
        assert process.poll() is None, log.read_text()
        assert httpx2.get(url).text.lower().startswith("<!doctype html>")  # the web app at /
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(httpx2.post, f"{url}/v1/captions", files=_files(RED), timeout=30)
            _wait_for(lambda: httpx2.get(f"{url}/health").json()["pending_images"] == 1)
            process.send_signal(signal.SIGTERM)
            assert in_flight.result(timeout=30).status_code == 200
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in log.read_text()


# Small timeouts and limits, so that each is reached in about a second.
GUARDED = ServeSettings(device="cpu", idle_timeout_s=0.5, header_timeout_s=1.0, body_timeout_s=1.0,
                        max_connections=6, max_connections_per_client=3, retry_after_s=2)  # fmt: skip


@pytest.fixture(scope="module")
def guarded_url(model_dir: Path) -> Iterator[str]:
    with _uvicorn_in_thread(model_dir, GUARDED) as (url, _):
        yield url


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    assert host == "127.0.0.1"
    return host, int(port)


def _until_closed(sock: socket.socket, limit_s: float, trickle: bytes = b"") -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and after how many seconds; sends `trickle` a byte
    every 0.1 s meanwhile (a slow client). Fails after `limit_s` with the connection still open."""
    started, received = time.monotonic(), b""
    to_send = itertools.cycle(trickle) if trickle else None
    sock.settimeout(0.1)
    while time.monotonic() - started < limit_s:
        if to_send is not None:
            try:
                sock.sendall(bytes([next(to_send)]))
            except OSError:  # closed by the server
                to_send = None
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received, time.monotonic() - started
        if not data:
            return received, time.monotonic() - started
        received += data
    raise AssertionError(f"still open after {limit_s} s; received {received!r}")


def _raw_error(raw: bytes, status: int, code: str) -> str:
    """The message of an error written on a raw connection, after checking its status line, close and JSON shape."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().lower().split("\r\n")
    assert lines[0].startswith(f"http/1.1 {status} ") and "connection: close" in lines, raw
    assert "content-type: application/json" in lines
    return _error(httpx2.Response(status, content=body), status, code)


def test_an_idle_connection_is_closed_after_the_idle_timeout(guarded_url: str) -> None:
    with socket.create_connection(_address(guarded_url)) as fresh:
        assert _until_closed(fresh, limit_s=5)[0] == b""  # nothing sent: closed without an answer
    with socket.create_connection(_address(guarded_url)) as kept:
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answered, seconds = _until_closed(kept, limit_s=5)
    assert answered.startswith(b"HTTP/1.1 200 ") and 0.4 < seconds < 3  # kept alive, then closed when idle


def test_headers_sent_a_byte_at_a_time_get_408_after_the_header_timeout(guarded_url: str) -> None:
    with socket.create_connection(_address(guarded_url)) as slow:
        slow.sendall(b"GET /health HTTP/1.1\r\n")
        raw, seconds = _until_closed(slow, limit_s=5, trickle=b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n")
    assert "within 1 s (--header-timeout-s)" in _raw_error(raw, 408, "header_timeout")
    assert 0.9 < seconds < 3  # the whole header's time, not the time between bytes (the idle timeout is 0.5 s)


def test_a_body_sent_a_byte_at_a_time_gets_408_after_the_body_timeout(guarded_url: str) -> None:
    with socket.create_connection(_address(guarded_url)) as slow:
        slow.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10000\r\n\r\n")  # fmt: skip
        raw, seconds = _until_closed(slow, limit_s=5, trickle=b"[")
    assert "within 1 s (--body-timeout-s)" in _raw_error(raw, 408, "body_timeout")
    assert 0.9 < seconds < 3
    _assert_healthy(httpx2.Client(base_url=guarded_url))


def test_a_request_uvicorn_cannot_parse_gets_a_json_400(guarded_url: str) -> None:
    with socket.create_connection(_address(guarded_url)) as garbled:
        garbled.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        raw, _ = _until_closed(garbled, limit_s=5)
    assert "not a valid HTTP/1.1 request" in _raw_error(raw, 400, "invalid_http")


@pytest.mark.parametrize(("per_client", "named"), [(3, "3 connections from 127.0.0.1 (--max-connections-per-client)"),
                                                   (6, "6 connections (--max-connections)")])  # fmt: skip
def test_connections_over_the_limits_are_refused_at_once(model_dir: Path, per_client: int, named: str) -> None:
    limits = replace(GUARDED, idle_timeout_s=30, header_timeout_s=30, max_connections_per_client=per_client)
    with _uvicorn_in_thread(model_dir, limits) as (url, _), contextlib.ExitStack() as held:
        half_sent = [held.enter_context(socket.create_connection(_address(url))) for _ in range(per_client)]
        for sock in half_sent:
            sock.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: x\r\n")
        with socket.create_connection(_address(url)) as refused:
            raw, seconds = _until_closed(refused, limit_s=5)
        assert named in _raw_error(raw, 503, "too_many_connections") and seconds < 2  # the others wait 30 s
        assert b"retry-after: 2" in raw.lower()
        held.close()  # the half-sent requests go: their slots are free again
        _wait_for(lambda: _answers(f"{url}/health"), timeout=5)
        _assert_healthy(httpx2.Client(base_url=url))


def _answers(url: str) -> bool:
    try:
        return httpx2.get(url, timeout=2).status_code == 200
    except httpx2.TransportError:
        return False
