"""The label store: bins queued for a recount, and every recount people make, in a real database.

SQLite (a file) by default, PostgreSQL by URL for a team, through SQLAlchemy: the same `--storage`
convention as `binsight tune`. The schema is versioned (`binsight_schema`); `open_store` upgrades an
older database in one transaction, step by step, and refuses a newer one.

Every recount is its own row, inserted, never updated: two people recounting the same bin at the
same moment both land, and resolution (`resolve.py`) reads all of them. A queue item is claimed by one
person at a time with a short lease (a conditional UPDATE, atomic on both engines), so two people are
not shown the same bin unless it needs independent recounts from both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from binsight.errors import BinsightError
from binsight.utils.redact import redact

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
OUTCOMES = ("counted", "skip", "cant_tell", "not_found")
# Row ids are 64-bit signed integers in SQLite and PostgreSQL alike.
_LARGEST_ID = 2**63 - 1

metadata = sa.MetaData()
schema_table = sa.Table("binsight_schema", metadata, sa.Column("version", sa.Integer, nullable=False))
items = sa.Table(
    "recheck_items",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("photo_id", sa.String(512), nullable=False),
    sa.Column("image", sa.String(2048), nullable=False),  # a path or s3:// URI the server may read
    sa.Column("queue", sa.String(200), nullable=False),  # where it came from: an audit run, traffic, a list
    sa.Column("reason", sa.String(40), nullable=False),  # "suspicious" (catch errors) or "informative"
    sa.Column("priority", sa.Float, nullable=False),
    sa.Column("recorded", sa.Integer, nullable=True),  # the inventory record, when known
    sa.Column("predicted", sa.Integer, nullable=True),  # the model's answer when it was queued
    sa.Column("model_version", sa.String(200), nullable=False, server_default=""),
    sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    sa.Column("claimed_by", sa.String(200), nullable=True),
    sa.Column("claim_expires", sa.DateTime(timezone=True), nullable=True),
    sa.UniqueConstraint("queue", "photo_id", name="one_item_per_photo_and_queue"),
)
recounts = sa.Table(
    "recheck_recounts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("item_id", sa.Integer, sa.ForeignKey("recheck_items.id"), nullable=False, index=True),
    sa.Column("photo_id", sa.String(512), nullable=False, index=True),
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("count", sa.Integer, nullable=True),
    sa.Column("who", sa.String(200), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("model_version", sa.String(200), nullable=False, server_default=""),
    sa.Column("queue", sa.String(200), nullable=False),
)


def _version_1(connection: Connection) -> None:
    """The first schema: items and recounts."""
    metadata.create_all(connection, tables=[items, recounts])


def _version_2(connection: Connection) -> None:
    """Recounts are looked up by who made them (the next bin for a person skips the ones they did)."""
    # Plain DDL (SQLite and PostgreSQL both have it): an Index object would join the table's metadata
    # and be created by version 1 too.
    connection.execute(
        sa.text("CREATE INDEX IF NOT EXISTS recounts_by_who ON recheck_recounts (item_id, who)")
    )


MIGRATIONS: tuple[Callable[[Connection], None], ...] = (_version_1, _version_2)


def storage_url(storage: str | None, default_dir: Path) -> str:
    """A database URL: as given, or a SQLite file in `default_dir`."""
    if storage:
        return storage
    default_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(default_dir / 'recheck.db').resolve()}"


def open_engine(url: str) -> Engine:
    try:
        engine = sa.create_engine(url, future=True, pool_pre_ping=True)
        if engine.dialect.name == "sqlite":
            # Concurrent writers wait for each other instead of failing at once.
            sa.event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA busy_timeout = 30000"))
        with engine.begin() as connection:
            _migrate(connection)
    except (sa.exc.SQLAlchemyError, ImportError) as exc:
        raise BinsightError(
            f"cannot open the label store {redact(url)}: {redact(str(exc).splitlines()[0])}",
            hint="PostgreSQL needs binsight's [postgres] extra; a SQLite path needs a writable folder",
        ) from None
    return engine


def _migrate(connection: Connection) -> None:
    metadata.create_all(connection, tables=[schema_table])
    current = connection.execute(sa.select(sa.func.max(schema_table.c.version))).scalar() or 0
    if current > SCHEMA_VERSION:
        raise BinsightError(
            f"the label store is at schema {current}, newer than this binsight's {SCHEMA_VERSION}",
            hint="upgrade binsight before using this store",
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        MIGRATIONS[version - 1](connection)
        connection.execute(sa.delete(schema_table))
        connection.execute(sa.insert(schema_table).values(version=version))
        log.info("label store upgraded to schema %d", version)


@dataclass(frozen=True)
class QueueEntry:
    """One bin to put in front of people."""

    photo_id: str
    image: str
    queue: str
    reason: str
    priority: float
    recorded: int | None = None
    predicted: int | None = None
    model_version: str = ""


@dataclass(frozen=True)
class Item:
    id: int
    photo_id: str
    image: str
    queue: str
    reason: str
    priority: float
    recorded: int | None
    predicted: int | None
    model_version: str


@dataclass(frozen=True)
class Recount:
    item_id: int
    photo_id: str
    outcome: str
    count: int | None
    who: str
    at: datetime
    queue: str
    model_version: str


def now() -> datetime:
    return datetime.now(UTC)


class LabelStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = open_engine(url)

    def add(self, entries: list[QueueEntry]) -> int:
        """Queue entries not already in their queue; returns how many were added."""
        added = 0
        with self.engine.begin() as connection:
            existing = {
                (row.queue, row.photo_id)
                for row in connection.execute(sa.select(items.c.queue, items.c.photo_id))
            }
            fresh = [e for e in entries if (e.queue, e.photo_id) not in existing]
            if fresh:
                stamp = now()
                connection.execute(
                    sa.insert(items),
                    [
                        {
                            "photo_id": e.photo_id,
                            "image": e.image,
                            "queue": e.queue,
                            "reason": e.reason,
                            "priority": e.priority,
                            "recorded": e.recorded,
                            "predicted": e.predicted,
                            "model_version": e.model_version,
                            "created": stamp,
                        }
                        for e in fresh
                    ],
                )
                added = len(fresh)
        return added

    def items(self) -> list[Item]:
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(items).order_by(items.c.priority.desc(), items.c.id)).all()
        return [_item(row) for row in rows]

    def item(self, item_id: int) -> Item | None:
        if not 1 <= item_id <= _LARGEST_ID:  # a URL's id past the database's integers: no such bin
            return None
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(items).where(items.c.id == item_id)).first()
        return _item(row) if row else None

    def recounts(self, item_id: int | None = None) -> list[Recount]:
        query = sa.select(recounts).order_by(recounts.c.id)
        if item_id is not None:
            query = query.where(recounts.c.item_id == item_id)
        with self.engine.connect() as connection:
            rows = [row._mapping for row in connection.execute(query)]
        # ("count" is also a method of a result row, so the columns are read by name)
        return [
            Recount(
                r["item_id"],
                r["photo_id"],
                r["outcome"],
                r["count"],
                r["who"],
                r["at"],
                r["queue"],
                r["model_version"],
            )
            for r in rows
        ]

    def claim(self, item_id: int, who: str, lease: timedelta) -> bool:
        """Take an item for `who` unless someone else holds an unexpired claim (atomic)."""
        stamp = now()
        with self.engine.begin() as connection:
            result = connection.execute(
                sa.update(items)
                .where(items.c.id == item_id)
                .where(
                    sa.or_(
                        items.c.claimed_by.is_(None),
                        items.c.claimed_by == who,
                        items.c.claim_expires < stamp,
                    )
                )
                .values(claimed_by=who, claim_expires=stamp + lease)
            )
            return bool(result.rowcount)

    def release(self, item_id: int, who: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                sa.update(items)
                .where(items.c.id == item_id, items.c.claimed_by == who)
                .values(claimed_by=None, claim_expires=None)
            )

    def record(self, item_id: int, who: str, outcome: str, count: int | None) -> Recount:
        """Insert one recount (and free the item): never overwrites another person's answer."""
        if outcome not in OUTCOMES:
            raise BinsightError(f"outcome {outcome!r} is not one of {', '.join(OUTCOMES)}")
        if (outcome == "counted") != (count is not None):
            raise BinsightError("a recount gives a count exactly when its outcome is 'counted'")
        if count is not None and not 0 <= count <= 100_000:
            raise BinsightError(f"count {count} is out of range (0 to 100000)")
        item = self.item(item_id)
        if item is None:
            raise BinsightError(f"no queued bin {item_id}")
        stamp = now()
        with self.engine.begin() as connection:
            connection.execute(
                sa.insert(recounts).values(
                    item_id=item_id,
                    photo_id=item.photo_id,
                    outcome=outcome,
                    count=count,
                    who=who,
                    at=stamp,
                    model_version=item.model_version,
                    queue=item.queue,
                )
            )
            connection.execute(
                sa.update(items)
                .where(items.c.id == item_id, items.c.claimed_by == who)
                .values(claimed_by=None, claim_expires=None)
            )
        return Recount(item_id, item.photo_id, outcome, count, who, stamp, item.queue, item.model_version)

    def state(self) -> dict[str, int]:
        """Sizes, for run records: items, recounts, and the schema version."""
        with self.engine.connect() as connection:
            n_items = connection.execute(sa.select(sa.func.count()).select_from(items)).scalar() or 0
            n_recounts = connection.execute(sa.select(sa.func.count()).select_from(recounts)).scalar() or 0
        return {"items": int(n_items), "recounts": int(n_recounts), "schema": SCHEMA_VERSION}


def _item(row: sa.Row) -> Item:  # type: ignore[type-arg]
    return Item(
        row.id,
        row.photo_id,
        row.image,
        row.queue,
        row.reason,
        row.priority,
        row.recorded,
        row.predicted,
        row.model_version,
    )
