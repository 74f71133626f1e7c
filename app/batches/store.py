"""Files, batches and per-line results in SQLite: the durable half of batch jobs.

Plain synchronous code over one connection; app/batches/service.py calls it from a single thread off
the event loop. The promise it keeps: a line's answer is written in the same transaction that marks
the line done (`record_line`), and only if the line was not done yet, so a process killed at any
instant leaves each line either answered once or still pending — never lost, never answered twice —
and output files are built from those rows alone.

WAL with synchronous=NORMAL: a committed transaction survives the process being killed; a power cut
may roll back the last few, which only sends those lines back to pending.

Several workers (processes, Ray Serve replicas) may share one store: a batch is worked by one of them at
a time, the holder of its lease (`batch_leases`: owner id and expiry, wall-clock seconds since all the
workers of a host read the same clock). The owner renews it while it works (`renew_lease`), gives it
back when it stops (`release_lease`); a worker killed without a word leaves it to expire, and the next
`claim_batch` after that takes the batch over. Answers are fenced by the lease: `record_line` writes
only for the current owner, so a worker that stalled past its expiry and lost the batch cannot write
into it (its line runs again under the new owner, and is answered once).
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec

from app.batches.input_file import BatchLine
from app.batches.schemas import (ACTIVE_STATUSES, Batch, BatchError, BatchErrors, BatchStatus, CreateBatchRequest,
                                 FileObject, LineError, OutputLine, RequestCounts)

SCHEMA_VERSION = 2  # 2 added batch_leases; a version-1 file is upgraded in place (the table is new)
# Files and batches belong to a tenant ("" = the open server's), and a batch runs as the key that made it.
# A database made before tenants gets these columns added (its rows belong to ""); the columns have
# defaults, so an older mmserve still reads and writes the database.
TENANT_COLUMNS = (("files", "tenant"), ("batches", "tenant"), ("batches", "key_id"))
SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, purpose TEXT NOT NULL, filename TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, content BLOB NOT NULL, tenant TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, input_file_id TEXT NOT NULL, endpoint TEXT NOT NULL,
    completion_window TEXT NOT NULL, status TEXT NOT NULL, total INTEGER NOT NULL DEFAULT 0,
    metadata TEXT, errors TEXT, output_file_id TEXT, error_file_id TEXT, created_at INTEGER NOT NULL,
    expires_at INTEGER, in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER,
    failed_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    tenant TEXT NOT NULL DEFAULT '', key_id TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT NOT NULL, body BLOB NOT NULL,
    status_code INTEGER,  -- NULL while pending
    result BLOB,          -- the output line (JSON), written with status_code in one transaction
    PRIMARY KEY (batch_id, line_no)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batch_lines_by_status ON batch_lines (batch_id, status_code);
CREATE TABLE IF NOT EXISTS batch_leases (
    batch_id TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID;
"""
_COUNTS = """(SELECT COUNT(*) FROM batch_lines l WHERE l.batch_id = b.id AND l.status_code = 200) AS completed,
             (SELECT COUNT(*) FROM batch_lines l WHERE l.batch_id = b.id AND l.status_code <> 200) AS failed"""
_TIMESTAMPED = frozenset({"in_progress", "finalizing", "completed", "failed", "cancelling", "cancelled"})
SECONDS_IN_WINDOW = 24 * 3600


class LeaseLost(Exception):
    """The worker's lease on a batch expired and another worker took the batch over."""


class BatchStore:
    def __init__(self, path: Path, busy_timeout_s: float = 30.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: every write below opens its own BEGIN IMMEDIATE transaction.
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, 1, SCHEMA_VERSION):
            raise sqlite3.DatabaseError(f"{path}: batch database schema version {version}; "
                                        f"this mmserve reads version {SCHEMA_VERSION}")
        self.conn.executescript(SCHEMA)  # idempotent; executescript runs outside any transaction
        with self._transaction() as db:
            for table, column in TENANT_COLUMNS:
                if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
        self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front: a read-then-write transaction never has to upgrade
        # (and fail with SQLITE_BUSY) while another process holds it.
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- files -------------------------------------------------------------------------------------
    # Every read takes the caller's tenant: another tenant's id reads as no such id (a 404, never a 403,
    # which would tell that the id exists).
    def add_file(self, filename: str, purpose: str, content: bytes, tenant: str = "") -> FileObject:
        file = FileObject(f"file-{uuid.uuid4().hex}", len(content), int(time.time()), filename, purpose)
        with self._transaction() as db:
            self._insert_file(db, file, content, tenant)
        return file

    @staticmethod
    def _insert_file(db: sqlite3.Connection, file: FileObject, content: bytes, tenant: str) -> None:
        db.execute("INSERT INTO files (id, purpose, filename, bytes, created_at, content, tenant) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (file.id, file.purpose, file.filename, file.bytes, file.created_at, content, tenant))

    def get_file(self, file_id: str, tenant: str = "") -> FileObject | None:
        row = self.conn.execute("SELECT id, bytes, created_at, filename, purpose FROM files WHERE id = ? AND "
                                "tenant = ?", (file_id, tenant)).fetchone()
        return FileObject(*row) if row else None

    def list_files(self, purpose: str | None, limit: int, order: str, after: str | None,
                   tenant: str = "") -> tuple[list[FileObject], bool]:
        """Oldest or newest first (`order` "asc" or "desc": upload order, which is created_at's); `after`
        is the last id of the previous page. Returns (page, has_more)."""
        compare, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        where, args = ["tenant = ?"], [tenant]
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        if after is not None:
            where.append(f"rowid {compare} (SELECT rowid FROM files WHERE id = ?)")
            args.append(after)
        rows = self.conn.execute(f"SELECT id, bytes, created_at, filename, purpose FROM files WHERE "
                                 f"{' AND '.join(where)} ORDER BY rowid {direction} LIMIT ?",
                                 (*args, limit + 1)).fetchall()
        return [FileObject(*row) for row in rows[:limit]], len(rows) > limit

    def file_content(self, file_id: str, tenant: str = "") -> bytes | None:
        row = self.conn.execute("SELECT content FROM files WHERE id = ? AND tenant = ?", (file_id, tenant)).fetchone()
        return bytes(row[0]) if row else None

    # -- batches -----------------------------------------------------------------------------------
    def add_batch(self, request: CreateBatchRequest, tenant: str = "", key_id: str = "") -> Batch:
        """`key_id`: the key the batch's lines run as (charged to it, audited under it)."""
        batch_id, now = f"batch_{uuid.uuid4().hex}", int(time.time())
        metadata = msgspec.json.encode(request.metadata).decode() if request.metadata is not None else None
        with self._transaction() as db:
            db.execute("INSERT INTO batches (id, input_file_id, endpoint, completion_window, status, metadata, "
                       "created_at, expires_at, tenant, key_id) VALUES (?, ?, ?, ?, 'validating', ?, ?, ?, ?, ?)",
                       (batch_id, request.input_file_id, request.endpoint, request.completion_window, metadata,
                        now, now + SECONDS_IN_WINDOW, tenant, key_id))
        batch = self.get_batch(batch_id, tenant)
        assert batch is not None, "a batch just inserted must be readable"
        return batch

    def get_batch(self, batch_id: str, tenant: str | None = "") -> Batch | None:
        """`tenant` None: whoever owns it (the worker's view)."""
        row = self.conn.execute(f"SELECT b.*, {_COUNTS} FROM batches b WHERE b.id = ? AND (? IS NULL OR b.tenant = ?)",
                                (batch_id, tenant, tenant)).fetchone()
        return _batch(row) if row else None

    def owner(self, batch_id: str) -> tuple[str, str] | None:
        """(tenant, key_id) of a batch: whose key its lines run as."""
        row = self.conn.execute("SELECT tenant, key_id FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def list_batches(self, limit: int, after: str | None = None, tenant: str = "") -> tuple[list[Batch], bool]:
        """Newest first; `after` is the last id of the previous page. Returns (page, has_more)."""
        cursor = "AND b.rowid < (SELECT rowid FROM batches WHERE id = ?)" if after else ""
        rows = self.conn.execute(f"SELECT b.*, {_COUNTS} FROM batches b WHERE b.tenant = ? {cursor} ORDER BY "
                                 "b.rowid DESC LIMIT ?", (tenant, *((after,) if after else ()), limit + 1)).fetchall()
        return [_batch(r) for r in rows[:limit]], len(rows) > limit

    def next_active_batch(self) -> Batch | None:
        """The oldest batch some worker still has work in."""
        marks = ", ".join("?" * len(ACTIVE_STATUSES))
        row = self.conn.execute(f"SELECT b.*, {_COUNTS} FROM batches b WHERE b.status IN ({marks}) "
                                "ORDER BY b.rowid LIMIT 1", ACTIVE_STATUSES).fetchone()
        return _batch(row) if row else None

    # -- leases ------------------------------------------------------------------------------------
    def claim_batch(self, owner: str, lease_s: float,
                    dead: Callable[[str], bool] = lambda _: False) -> tuple[Batch, str | None] | None:
        """Lease the oldest active batch nobody holds (no lease, an expired one, one of `owner`'s own, or
        one whose owner `dead` says is gone: a killed server restarted on the same host need not wait for
        the expiry) to `owner` for `lease_s` seconds. Returns the batch and the owner it was taken over
        from (None when it was free), or None when there is no such batch. One transaction: two workers
        claiming at once get different batches, or one gets None."""
        marks = ", ".join("?" * len(ACTIVE_STATUSES))
        with self._transaction() as db:
            now = time.time()
            rows = db.execute(f"SELECT b.id, l.owner, l.expires_at FROM batches b LEFT JOIN batch_leases l "
                              f"ON l.batch_id = b.id WHERE b.status IN ({marks}) ORDER BY b.rowid",
                              ACTIVE_STATUSES).fetchall()
            free = next((r for r in rows if r[1] is None or r[1] == owner or r[2] < now or dead(r[1])), None)
            if free is None:
                return None
            db.execute("INSERT OR REPLACE INTO batch_leases (batch_id, owner, expires_at) VALUES (?, ?, ?)",
                       (free[0], owner, now + lease_s))
        batch = self.get_batch(free[0], None)  # whoever's: the worker runs every tenant's batches
        assert batch is not None, "a leased batch is never deleted"
        return batch, (free[1] if free[1] not in (None, owner) else None)

    def renew_lease(self, batch_id: str, owner: str, lease_s: float) -> bool:
        """Push the expiry on; False when `owner` no longer holds the lease (it was taken over)."""
        with self._transaction() as db:
            return db.execute("UPDATE batch_leases SET expires_at = ? WHERE batch_id = ? AND owner = ?",
                              (time.time() + lease_s, batch_id, owner)).rowcount == 1

    def release_lease(self, batch_id: str, owner: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM batch_leases WHERE batch_id = ? AND owner = ?", (batch_id, owner))

    def lease_owner(self, batch_id: str) -> str | None:
        row = self.conn.execute("SELECT owner FROM batch_leases WHERE batch_id = ?", (batch_id,)).fetchone()
        return row[0] if row else None

    def request_cancel(self, batch_id: str, tenant: str = "") -> Batch | None:
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM batches WHERE id = ? AND tenant = ?", (batch_id, tenant)).fetchone() is None:
                return None
            self._move(db, batch_id, ("validating", "in_progress"), "cancelling")
        return self.get_batch(batch_id, tenant)

    def start_batch(self, batch_id: str, lines: list[BatchLine]) -> bool:
        """validating -> in_progress with its lines stored, in one transaction; False if the batch had
        left `validating` meanwhile (a cancel)."""
        with self._transaction() as db:
            if not self._move(db, batch_id, ("validating",), "in_progress"):
                return False
            db.executemany("INSERT INTO batch_lines (batch_id, line_no, custom_id, body) VALUES (?, ?, ?, ?)",
                           [(batch_id, line.line_no, line.custom_id, line.body) for line in lines])
            db.execute("UPDATE batches SET total = ? WHERE id = ?", (len(lines), batch_id))
        return True

    def fail_batch(self, batch_id: str, errors: list[BatchError]) -> None:
        with self._transaction() as db:
            db.execute("UPDATE batches SET errors = ? WHERE id = ?",
                       (msgspec.json.encode(BatchErrors(errors)).decode(), batch_id))
            self._move(db, batch_id, ACTIVE_STATUSES, "failed")

    def move(self, batch_id: str, from_statuses: tuple[BatchStatus, ...], to: BatchStatus) -> bool:
        with self._transaction() as db:
            return self._move(db, batch_id, from_statuses, to)

    @staticmethod
    def _move(db: sqlite3.Connection, batch_id: str, from_statuses: tuple[str, ...], to: str) -> bool:
        assert to in _TIMESTAMPED, f"no timestamp column for status {to}"
        marks = ", ".join("?" * len(from_statuses))
        changed = db.execute(f"UPDATE batches SET status = ?, {to}_at = ? WHERE id = ? AND status IN ({marks})",
                             (to, int(time.time()), batch_id, *from_statuses)).rowcount
        return changed == 1

    # -- lines -------------------------------------------------------------------------------------
    def pending_lines(self, batch_id: str, after_line: int, limit: int) -> list[tuple[int, str, bytes]]:
        rows = self.conn.execute("SELECT line_no, custom_id, body FROM batch_lines WHERE batch_id = ? AND "
                                 "status_code IS NULL AND line_no > ? ORDER BY line_no LIMIT ?",
                                 (batch_id, after_line, limit)).fetchall()
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    def record_line(self, batch_id: str, line_no: int, status_code: int, result: bytes,
                    owner: str | None = None) -> BatchStatus:
        """Answer a line (only if it is still pending) and return the batch's status, which tells the
        worker whether a cancel arrived. With `owner`, only while that worker holds the batch's lease:
        LeaseLost otherwise, and nothing is written."""
        return self.answer_line(batch_id, line_no, status_code, result, owner)[0]

    def answer_line(self, batch_id: str, line_no: int, status_code: int, result: bytes,
                    owner: str | None = None) -> tuple[BatchStatus, bool]:
        """`record_line`, and whether this answer is the one stored (False: the line was answered
        already): only the stored answer is charged and audited."""
        with self._transaction() as db:
            if owner is not None and db.execute("SELECT 1 FROM batch_leases WHERE batch_id = ? AND owner = ?",
                                                (batch_id, owner)).fetchone() is None:
                raise LeaseLost(f"{owner} no longer holds the lease on {batch_id}")
            stored = db.execute("UPDATE batch_lines SET status_code = ?, result = ? WHERE batch_id = ? AND "
                                "line_no = ? AND status_code IS NULL",
                                (status_code, result, batch_id, line_no)).rowcount == 1
            return db.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()[0], stored

    def finalize(self, batch_id: str, from_status: BatchStatus, to: BatchStatus) -> bool:
        """Write the output file (answered lines with status 200) and the error file (the others; when
        cancelled, the lines never run too), and move the batch to its final status: one transaction,
        so a crash here leaves the batch to be finalized again, never half-written."""
        with self._transaction() as db:
            status, tenant = db.execute("SELECT status, tenant FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if status != from_status:
                return False
            output, errors = [], []
            for custom_id, status_code, result in db.execute(
                    "SELECT custom_id, status_code, result FROM batch_lines WHERE batch_id = ? ORDER BY line_no",
                    (batch_id,)):
                if status_code is None:
                    result = msgspec.json.encode(OutputLine(
                        f"batch_req_{uuid.uuid4().hex}", custom_id, None,
                        LineError("batch_cancelled", "the batch was cancelled before this request ran")))
                (output if status_code == 200 else errors).append(bytes(result))
            file_ids = []
            for suffix, lines in (("output", output), ("error", errors)):
                if not lines:
                    file_ids.append(None)
                    continue
                content = b"\n".join(lines) + b"\n"
                file = FileObject(f"file-{uuid.uuid4().hex}", len(content), int(time.time()),
                                  f"{batch_id}_{suffix}.jsonl", "batch_output")
                self._insert_file(db, file, content, tenant)
                file_ids.append(file.id)
            db.execute("UPDATE batches SET output_file_id = ?, error_file_id = ? WHERE id = ?", (*file_ids, batch_id))
            return self._move(db, batch_id, (from_status,), to)


def _batch(row: sqlite3.Row) -> Batch:
    errors = msgspec.json.decode(row["errors"], type=BatchErrors) if row["errors"] else None
    metadata = msgspec.json.decode(row["metadata"]) if row["metadata"] else None
    return Batch(
        id=row["id"], object="batch", endpoint=row["endpoint"], input_file_id=row["input_file_id"],
        completion_window=row["completion_window"], status=row["status"], created_at=row["created_at"],
        request_counts=RequestCounts(row["total"], row["completed"], row["failed"]), errors=errors,
        output_file_id=row["output_file_id"], error_file_id=row["error_file_id"],
        in_progress_at=row["in_progress_at"], expires_at=row["expires_at"], finalizing_at=row["finalizing_at"],
        completed_at=row["completed_at"], failed_at=row["failed_at"], cancelling_at=row["cancelling_at"],
        cancelled_at=row["cancelled_at"], metadata=metadata)
