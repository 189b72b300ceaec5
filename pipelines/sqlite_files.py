"""The command's in-process Dagster run and its instance's SQLite files: kept open while the run
writes them, and the event log connecting through one engine per file, so that a fully cached
`sftdag prepare` does not spend its run checkpointing files and setting up engines per event."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def sqlite_files_kept_open(instance, run_id: str):
    """While entered, a connection stays open to each SQLite file of `instance` that run `run_id`
    writes (its event log shard, the event index, the runs table; none on Postgres).

    Dagster opens and closes a connection for each event it stores, and closing a file's last
    connection checkpoints its write-ahead log into it and deletes the log, with fsyncs each time:
    40% of the Dagster run of a fully cached `sftdag prepare`. Beside an idle connection none is
    the last; every commit is still synced, and the last close here checkpoints once. The event
    log's connections also come from one SQLAlchemy engine per file (`_engines_reused`), not a new
    engine (and dialect set-up) per event.
    """
    import sqlite3

    from dagster._core.storage.event_log import SqliteEventLogStorage  # not exported by dagster
    from dagster._core.storage.runs import SqliteRunStorage

    kept: list[sqlite3.Connection] = []
    restore = contextlib.nullcontext()

    def keep(path: str, statement: str = "SELECT count(*) FROM sqlite_master") -> None:
        # A connection counts once it has read (it then maps the log's index); the read ends at once.
        kept.append(sqlite3.connect(path, isolation_level=None))
        kept[-1].execute(statement).fetchall()

    try:
        events = instance.event_log_storage
        if isinstance(events, SqliteEventLogStorage):
            # The run's shard is made here, as its first event would make it, but in WAL mode from the
            # start: Dagster creates its tables one statement at a time before it turns WAL on, each
            # committed through a rollback journal (four fsyncs, not one).
            keep(events.path_for_shard(run_id), "PRAGMA journal_mode=WAL")
            with events.run_connection(run_id):  # Dagster creates its tables in it
                pass
            kept[-1].execute("SELECT count(*) FROM sqlite_master").fetchall()  # the file had no log to map before
            with events.index_connection() as conn:
                keep(conn.engine.url.database)
            restore = _engines_reused(events)
        if isinstance(instance.run_storage, SqliteRunStorage):
            with instance.run_storage.connect() as conn:
                keep(conn.engine.url.database)
        with restore:
            yield
    finally:
        for conn in kept:
            conn.close()


# What Dagster 1.13's `SqliteEventLogStorage._connect` reads and calls, in order (its code's
# names): `_engines_reused` replaces that method only while it is still this one.
MIRRORED_CONNECT_NAMES = ("_db_lock", "check", "str_param", "conn_string_for_shard", "create_engine", "NullPool",
                          "SQLITE_BUSY_TIMEOUT_SECONDS", "_initialized_dbs", "_initdb", "add", "connect", "begin",
                          "dispose")


def mirrors_connect(storage_type) -> bool:
    """Whether `storage_type._connect` is the Dagster method `_engines_reused` mirrors (a private
    method: another Dagster version may change it, and then it is left alone)."""
    code = getattr(getattr(storage_type._connect, "__wrapped__", None), "__code__", None)
    return (code is not None and getattr(code, "co_qualname", None) == "SqliteEventLogStorage._connect"
            and code.co_names == MIRRORED_CONNECT_NAMES)


@contextlib.contextmanager
def _engines_reused(events):
    """While entered, `events` (Dagster's SQLite event log) connects through one engine per file,
    each connection still new and in its own transaction, as its `_connect` does with a new
    engine every time. Left as it is where `_connect` is not the one this mirrors."""
    from dagster._core.storage.sql import create_engine
    from sqlalchemy.pool import NullPool

    if not mirrors_connect(type(events)):
        yield
        return
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import SQLITE_BUSY_TIMEOUT_SECONDS

    engines: dict[str, object] = {}

    @contextlib.contextmanager
    def connect(shard: str):
        with events._db_lock:
            conn_string = events.conn_string_for_shard(shard)
            engine = engines.get(conn_string)
            if engine is None:
                engine = engines[conn_string] = create_engine(
                    conn_string, poolclass=NullPool, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS})
            if shard not in events._initialized_dbs:
                events._initdb(engine)
                events._initialized_dbs.add(shard)
            with engine.connect() as conn:
                with conn.begin():
                    yield conn

    events._connect = connect
    try:
        yield
    finally:
        del events._connect
        for engine in engines.values():
            engine.dispose()
