"""Crash-safe file writing: a reader never sees half a file, and a killed run leaves no fake result."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The file's sha256, read in 1 MiB chunks (model files are tens of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over the target."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_csv(
    path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str]
) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row.get(key, "") for key in fieldnames})
    atomic_write_text(path, buffer.getvalue())


def read_text(path: str | os.PathLike[str], what: str = "") -> str:
    """A UTF-8 text file a person wrote (a manifest, a list, labels, settings), its newlines as
    written; a byte-order mark (Excel's "CSV UTF-8") is dropped. A missing or unreadable file, or one
    in another encoding, is a BinsightError naming it (as `what`, where given)."""
    from binsight.errors import BinsightError

    name = f"{what} {path}" if what else str(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return handle.read()
    except UnicodeDecodeError as exc:
        raise BinsightError(
            f"{name} is not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x})",
            hint="save it as UTF-8 (in Excel: Save As > CSV UTF-8)",
        ) from None
    except OSError as exc:
        raise BinsightError(f"cannot read {name}: {exc.strerror or exc}") from None


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of a UTF-8 CSV (read as `read_text` reads)."""
    from binsight.errors import BinsightError

    try:
        return list(csv.DictReader(io.StringIO(read_text(path), newline="")))
    except csv.Error as exc:
        raise BinsightError(f"{path} is not a readable CSV: {exc}") from None


def read_json_object(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """A JSON object of settings, without the keys that start with `_` (comments: a recipe's `_about`);
    anything else is a BinsightError naming the file and what it holds."""
    from binsight.errors import BinsightError

    try:
        values = json.loads(read_text(path, what))
    except (ValueError, RecursionError) as exc:
        raise BinsightError(f"{what} {path} is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise BinsightError(f"{what} {path} must hold a JSON object of settings, not {type(values).__name__}")
    return {key: value for key, value in values.items() if not key.startswith("_")}


def read_shards(files: Sequence[Path]) -> pa.Table:
    """A batch run's Parquet shards as one table; a damaged one is a BinsightError naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from binsight.errors import BinsightError

    tables = []
    for file in files:
        try:
            tables.append(pq.read_table(file))
        except (OSError, pa.ArrowException) as exc:
            raise BinsightError(
                f"{file} is not a readable Parquet file: {exc}",
                # a batch run trusts only shards that read whole (batch/run.py)
                hint="run the same `binsight predict` or `audit` command again: it rescores damaged shards",
            ) from None
    return pa.concat_tables(tables)


@contextlib.contextmanager
def exclusive_folder(folder: str | os.PathLike[str], what: str = "run") -> Iterator[Path]:
    """Hold `folder` for one writer: a second process gets a clear error instead of interleaving files.

    The lock is an advisory `flock` on `folder/.lock`, so it dies with its process (a `kill -9` leaves
    no stale lock). Holding it also proves that `.part` files left in the folder belong to a writer
    that was killed, so they are removed.
    """
    import fcntl

    from binsight.errors import BinsightError

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    handle = open(root / ".lock", "a+", encoding="utf-8")  # noqa: SIM115 - held until the block ends
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise BinsightError(
                f"{root} is in use by another {what} ({holder})",
                hint=f"wait for it to finish, or give this {what} another output folder",
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        for part in root.glob(".*.part"):
            part.unlink(missing_ok=True)
        yield root
    finally:
        handle.close()
