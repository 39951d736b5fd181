"""Server processes: uvicorn with limits on what one client may hold, and workers that share the load.

Two things uvicorn leaves open are closed here:
- A connection that never finishes its headers stays open forever, and headers are unbounded with the
  httptools parser. `GuardedHttpProtocol` gives each request `header_timeout_s` from its first byte (or
  from the connection's opening) to finish its headers, and at most `max_header_bytes` of them.
- With `--workers N` uvicorn's processes share one listening socket, and asyncio accepts every pending
  connection in one go, so one process takes a burst of keep-alive connections and the others idle.
  Here each worker listens on its own SO_REUSEPORT socket and the kernel spreads connections across
  them by hash; a worker that dies is restarted.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import time
from asyncio import TimerHandle, Transport
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from binsight.errors import BinsightError
from binsight.serving.api_schema import error_json
from binsight.serving.config import ServeConfig
from binsight.utils.redact import configure_logging

log = logging.getLogger(__name__)

WORKER_ENV = "BINSIGHT_WORKER"


def _plain_response(status: str, code: str, message: str) -> bytes:
    body = error_json(code, message)
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def guarded_protocol(header_timeout_s: float, max_header_bytes: int) -> type[HttpToolsProtocol]:
    class GuardedHttpProtocol(HttpToolsProtocol):
        _header_timer: TimerHandle | None = None
        _header_bytes = 0
        _reading_headers = True
        _tail = b""  # the last bytes seen, so a header terminator split across reads is found

        # uvicorn annotates the transport as asyncio.Transport; BaseTransport in the base class.
        def connection_made(self, transport: Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _refuse(self, status: str, code: str, message: str) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(_plain_response(status, code, message))
                self.transport.close()

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self._reading_headers and (self.cycle is None or self.cycle.response_complete):
                self._refuse("408 Request Timeout", "header_timeout", "the request headers came too slowly")

        def data_received(self, data: bytes) -> None:
            if self._reading_headers:
                end = (self._tail + data).find(b"\r\n\r\n")
                size = self._header_bytes + (len(data) if end < 0 else end + 4 - len(self._tail))
                if size > max_header_bytes:
                    self._refuse(
                        "431 Request Header Fields Too Large",
                        "headers_too_large",
                        f"the request line and headers are over {max_header_bytes} bytes",
                    )
                    return
                self._header_bytes += len(data)
                self._tail = (self._tail + data)[-3:]
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._reading_headers = False
            self._header_bytes, self._tail = 0, b""
            self._disarm()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._reading_headers = True

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedHttpProtocol


def uvicorn_config(app: Any, config: ServeConfig, log_level: str = "info") -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        http=guarded_protocol(config.header_timeout_s, config.max_header_bytes),
        limit_concurrency=config.max_connections,
        timeout_keep_alive=config.keep_alive_s,
        timeout_graceful_shutdown=5,
        access_log=config.access_log,
        log_level=log_level,
        # uvicorn's default dictConfig closes every logging handler in the process (the CLI's redacting
        # one included) and adds its own, unredacted; its loggers propagate to binsight's instead.
        log_config=None,
    )


def listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _worker(config_json: str, index: int, port: int) -> None:
    os.environ[WORKER_ENV] = str(index)
    configure_logging()
    config = ServeConfig.model_validate_json(config_json)
    from binsight.serving.app import create_app

    sock = listening_socket(config.host, port, reuse_port=True)
    uvicorn.Server(uvicorn_config(create_app(config), config)).run(sockets=[sock])


def serve(config: ServeConfig) -> None:
    from binsight.inference.runtime import load_counter
    from binsight.serving.auth import access_policy
    from binsight.serving.sources import model_source

    # Fail here, clearly, rather than in every worker: an unauthenticated public server, a bad tokens
    # file, an unloadable model.
    access_policy(
        config.host, config.tokens_file, config.no_auth, config.allowed_hosts, config.metrics_public
    )
    source = model_source(config)
    load_counter(source.local_path(source.signature()), 1, backend=config.backend, precision=config.precision)
    if config.workers == 1:
        from binsight.serving.app import create_app

        uvicorn.Server(uvicorn_config(create_app(config), config)).run()
        return
    with tempfile.TemporaryDirectory(prefix="binsight-prometheus-") as folder:
        # Workers are separate processes; Prometheus metrics are aggregated through files here.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        _supervise(config)


def _supervise(config: ServeConfig) -> None:
    """Run `config.workers` processes on one port, restart any that dies, stop all on SIGINT/SIGTERM."""
    from prometheus_client import multiprocess

    # Holding the port (bound, not listening) reserves it and resolves port 0 to a real one.
    anchor = listening_socket(config.host, config.port, reuse_port=True)
    port = anchor.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    # The workers need the real endpoint URL, credentials included (never written anywhere).
    payload = config.model_dump_json(context={"with_secrets": True})

    def start(index: int) -> multiprocessing.process.BaseProcess:
        process = context.Process(
            target=_worker, args=(payload, index, port), name=f"binsight-worker-{index}"
        )
        process.start()
        return process

    stopping = False

    def stop(signum: int, _: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    workers = [start(index) for index in range(config.workers)]
    started = [time.monotonic()] * config.workers
    quick_deaths = [0] * config.workers  # per slot, in a row: a worker that cannot start backs off
    restart_at: dict[int, float] = {}
    log.info("%d workers on %s:%d (SO_REUSEPORT)", config.workers, config.host, port)
    try:
        while not stopping:
            time.sleep(0.2)
            now = time.monotonic()
            for index, process in enumerate(workers):
                if stopping or process.is_alive():
                    continue
                if index not in restart_at:
                    if process.pid is not None:
                        # prometheus_client leaves it unannotated.
                        multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
                    quick_deaths[index] = quick_deaths[index] + 1 if now - started[index] < 10 else 0
                    delay = min(30.0, 2.0 ** quick_deaths[index] - 1)
                    restart_at[index] = now + delay
                    log.error(
                        "worker %d (pid %s) exited with %s; restarting it in %.0f s",
                        index,
                        process.pid,
                        process.exitcode,
                        delay,
                    )
                if min(quick_deaths) >= 3 and not any(p.is_alive() for p in workers):
                    raise BinsightError(
                        "every server worker keeps exiting right after it starts", hint="see the log above"
                    )
                if now >= restart_at[index]:
                    del restart_at[index]
                    workers[index], started[index] = start(index), time.monotonic()
    finally:
        for process in workers:
            if process.is_alive():
                process.terminate()
        for process in workers:
            process.join(timeout=15)
            if process.is_alive():
                process.kill()
        anchor.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
