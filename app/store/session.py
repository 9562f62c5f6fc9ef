"""Engines and sessions of the job store: SQLite by default (WAL, busy timeout), PostgreSQL by URL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from crosspatch.app.config import Settings

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Pooled connections per engine: enough for every thread that may hold one at once in the service (the
# 40 request threads of the default threadpool + the 8 session-finishing threads), so no request thread
# waits for a connection that a queued thread holds, and none is closed and reopened under load (an
# overflow connection is closed on return). Opened lazily; a PostgreSQL server needs max_connections
# above this per API process plus the workers'.
POOL_SIZE, MAX_OVERFLOW = 48, 16


def make_engine(url: str, *, write: bool = True) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and foreign keys on every connection.

    On SQLite a `write` engine opens its transactions with BEGIN IMMEDIATE (the write lock is taken up
    front, so a read-then-write transaction never fails on a lock upgrade); a read engine uses plain
    BEGIN, so readers never wait for each other or for the writer (WAL).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        on_disk = bool(parsed.database) and parsed.database != ":memory:"
        pool = {"pool_size": POOL_SIZE, "max_overflow": MAX_OVERFLOW} if on_disk else {}
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **pool)
        # Let SQLAlchemy emit BEGIN itself (pysqlite's implicit transactions defeat BEGIN IMMEDIATE).
        event.listen(engine, "connect", _sqlite_autocommit_driver)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate if write else _sqlite_begin)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW)


def _sqlite_autocommit_driver(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    dbapi_conn.isolation_level = None


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_begin(conn) -> None:  # type: ignore[no-untyped-def]
    conn.exec_driver_sql("BEGIN")


def _sqlite_begin_immediate(conn) -> None:  # type: ignore[no-untyped-def]
    # Take the write lock at BEGIN: two writers never deadlock on a read->write upgrade.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


class Store:
    """The job store of one process: an engine and its session factory."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        self.read_engine = make_engine(url, write=False) if self.dialect == "sqlite" else self.engine
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.read_sessions = sessionmaker(self.read_engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        """The store at `settings.database_url`."""
        assert settings.database_url is not None
        return cls(settings.database_url)

    @contextmanager
    def session(self, *, write: bool = True) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        factory = self.sessions if write else self.read_sessions
        with factory() as session, session.begin():
            yield session

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
        self.read_engine.dispose()
