"""Test helper: run an ASGI app with uvicorn in a background thread on a free loopback port, with the
same connection limits as `binsight serve`."""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

from binsight.serving.config import ServeConfig
from binsight.serving.server import listening_socket, uvicorn_config


class BackgroundServer:
    def __init__(self, app: Any, config: ServeConfig | None = None, host: str = "127.0.0.1") -> None:
        self._socket = listening_socket(host, 0, reuse_port=False)
        self.host, self.port = self._socket.getsockname()[:2]
        settings = uvicorn_config(app, config, log_level="warning") if config else None
        self.server = uvicorn.Server(
            settings or uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        )
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()
