"""Data capture: a sample of requests and predictions as JSON lines, for monitoring drift and quality.

A response never waits for the disk: records go into a bounded in-memory queue drained by a writer
thread; if the disk falls behind, records are dropped and counted rather than slowing requests. Files
rotate by size, one series per process, so worker processes never interleave lines.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from pathlib import Path
from typing import TextIO

from binsight.monitoring.capture_record import CaptureRecord

log = logging.getLogger(__name__)


class DataCapture:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        sample_rate: float = 1.0,
        max_file_bytes: int = 64 * 1024 * 1024,
        max_files: int = 20,
        queue_size: int = 10_000,
    ) -> None:
        self.directory = Path(directory)
        # Captured records hold other clients' S3 URIs, image hashes, embeddings and records: private
        # to the server's user, whatever the umask.
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        self.sample_rate = sample_rate
        self.max_file_bytes = max_file_bytes
        self.max_files = max_files
        self.dropped = 0
        self.written = 0
        self._queue: queue.Queue[CaptureRecord | None] = queue.Queue(queue_size)
        self._random = random.Random()
        self._thread = threading.Thread(target=self._drain, name="data-capture", daemon=True)
        self._thread.start()

    def record(self, entry: CaptureRecord) -> None:
        if self.sample_rate < 1.0 and self._random.random() >= self.sample_rate:
            return
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _new_file(self) -> Path:
        return (
            self.directory
            / f"capture-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{time.time_ns() % 10**9:09d}.jsonl"
        )

    def _prune(self, current: Path) -> None:
        """Keep the newest `max_files` files of the whole folder, whichever process (or an earlier run
        of the server) wrote them; a file written to in the last minute may belong to a live worker."""
        files = []
        for path in self.directory.glob("capture-*.jsonl"):
            try:
                files.append((path.stat().st_mtime, path))
            except FileNotFoundError:  # pruned by another worker just now
                continue
        files.sort()
        recent = time.time() - 60
        for mtime, old in files[: max(0, len(files) - self.max_files)]:
            if old != current and mtime < recent:
                old.unlink(missing_ok=True)

    def _open(self, path: Path) -> TextIO:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return os.fdopen(descriptor, "a", encoding="utf-8")

    def _drain(self) -> None:
        path = self._new_file()
        self._prune(path)
        handle = self._open(path)
        try:
            while True:
                entry = self._queue.get()
                if entry is None:
                    return
                try:
                    handle.write(entry.line() + "\n")
                    handle.flush()
                    self.written += 1
                    if handle.tell() >= self.max_file_bytes:
                        handle.close()
                        path = self._new_file()
                        handle = self._open(path)
                        self._prune(path)
                except OSError:
                    self.dropped += 1
                    log.exception("data capture could not write to %s", path)
        finally:
            handle.close()
