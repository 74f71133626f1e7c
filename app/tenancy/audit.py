"""The audit log: append-only JSONL, one record per request and per batch line, hash-chained.

    log = AuditLog(path, max_bytes)
    log.write({"kind": "request", "route": "/v1/chat/completions", ...})   # -> the record's hash

Each line is one JSON object with the caller's fields plus `seq` (0, 1, 2, ... across rotated files),
`time` (unix seconds), `prev` (the previous record's hash; 64 zeros for the first) and `hash` =
sha256 of the line's canonical JSON without `hash`. Changing, removing or reordering a record breaks
the chain at that point, and `verify` (`mmserve audit verify FILE`) names where. (Cutting records off
the end of the newest file leaves a shorter valid chain: no hash chain can see that by itself.)

Several worker processes share one log: a write takes an exclusive `flock` on FILE.lock, reads the
last record (its seq and hash; cached while the file is unchanged since this process's own last
write), and appends the line with one `write` call. Rotation by size under the same lock: FILE is
renamed FILE.000001, .000002, ... (oldest first) and the chain goes on in a fresh FILE.

A writer killed mid-line (kill -9) leaves a torn last line. The next writer (or the next start)
terminates it and appends a `torn_line` record carrying the torn bytes' length and sha256 and the
last whole record as `prev`, so the chain continues and `verify` accepts that torn line, and only it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

GENESIS = "0" * 64
CHAIN_FIELDS = ("seq", "time", "prev", "hash")
ROTATED = re.compile(r"\.(\d{6})$")
TAIL_CHUNK = 64 * 1024


def canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def record_hash(body: Mapping[str, Any]) -> str:
    """The hash of a record: over every field but `hash` itself (its `prev` included: the chain)."""
    return hashlib.sha256(canonical({k: v for k, v in body.items() if k != "hash"})).hexdigest()


def rotated_files(path: Path) -> list[Path]:
    """FILE's rotated predecessors, oldest first."""
    found = [p for p in path.parent.glob(path.name + ".*") if ROTATED.search(p.name)
             and p.name[:-7] == path.name]
    return sorted(found, key=lambda p: int(ROTATED.search(p.name).group(1)))


@dataclass(frozen=True, slots=True)
class _Tail:
    seq: int  # the last whole record's seq (-1: none yet)
    hash: str
    torn: bytes  # bytes after the last newline (a writer killed mid-line), b"" normally


def _read_tail(fd: int, size: int) -> tuple[bytes, bytes]:
    """(the last whole line, the bytes after it) of an open file of `size` bytes."""
    chunk = TAIL_CHUNK
    while True:
        start = max(0, size - chunk)
        data = os.pread(fd, size - start, start)
        cut = data.rfind(b"\n")
        torn = data[cut + 1:]
        before = data[:cut] if cut >= 0 else b""
        line_start = before.rfind(b"\n")
        if line_start >= 0 or start == 0:
            return before[line_start + 1:], torn
        chunk *= 4


def _tail_of(fd: int, size: int) -> _Tail | None:
    if size == 0:
        return None
    last, torn = _read_tail(fd, size)
    if torn:
        try:  # a whole record that only lacks its newline is not torn
            body = json.loads(torn)
            if isinstance(body, dict) and body.get("hash") == record_hash(body):
                return _Tail(body["seq"], body["hash"], b"")
        except ValueError:
            pass
    if not last:
        return _Tail(-1, GENESIS, torn) if torn else None
    body = json.loads(last)
    return _Tail(body["seq"], body["hash"], torn)


class AuditWriter(Protocol):
    """What writes audit records: `AuditLog`, or `NO_AUDIT` when the setting audit_log is "off"."""

    def write(self, record: Mapping[str, Any]) -> str: ...


class _NoAudit:
    def write(self, record: Mapping[str, Any]) -> str:
        return ""


NO_AUDIT: AuditWriter = _NoAudit()


def open_audit_log(settings) -> AuditWriter:
    """The log the settings name (audit_log, audit_max_bytes, audit_fsync), or NO_AUDIT."""
    path = settings.audit_log_path
    return NO_AUDIT if path is None else AuditLog(path, settings.audit_max_bytes, settings.audit_fsync)


class AuditLog:
    def __init__(self, path: Path | str, max_bytes: int = 64 * 1024 * 1024, fsync: bool = False) -> None:
        self.path, self.max_bytes, self.fsync = Path(path), max_bytes, fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._lock_fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        self._known: tuple[int, int, int, str] | None = None  # (inode, size, seq, hash) after our last write
        with self._locked():  # repair a torn line a killed writer left, before anyone reads the log
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                self._tail(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        os.close(self._lock_fd)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def write(self, record: Mapping[str, Any]) -> str:
        """Append one record (any JSON fields but seq, time, prev, hash); returns its hash."""
        clash = [k for k in CHAIN_FIELDS if k in record]
        assert not clash, f"audit records may not set {clash}"
        with self._locked():
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                seq, prev = self._tail(fd)
                body = {**record, "seq": seq + 1, "time": round(time.time(), 6), "prev": prev}
                body["hash"] = digest = record_hash(body)
                line = canonical(body) + b"\n"
                size = os.fstat(fd).st_size
                if size and size + len(line) > self.max_bytes:
                    os.close(fd)
                    fd = -1
                    self._rotate()
                    fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
                    size = 0
                os.write(fd, line)
                if self.fsync:
                    os.fsync(fd)
                self._known = (os.fstat(fd).st_ino, size + len(line), seq + 1, digest)
                return digest
            finally:
                if fd >= 0:
                    os.close(fd)

    def _tail(self, fd: int) -> tuple[int, str]:
        """(seq, hash) of the last record; a torn line is repaired first. Under the lock."""
        st = os.fstat(fd)
        if self._known is not None and self._known[:2] == (st.st_ino, st.st_size):
            return self._known[2], self._known[3]
        tail = _tail_of(fd, st.st_size)
        if tail is None or tail.seq < 0:  # no whole record here: the chain goes on from the newest rotated file
            before = self._rotated_tail()
            if tail is None:
                return before
            tail = _Tail(*before, tail.torn)
        if st.st_size and os.pread(fd, 1, st.st_size - 1) != b"\n":
            os.write(fd, b"\n")
        if not tail.torn:
            return tail.seq, tail.hash
        body = {"kind": "torn_line", "torn_bytes": len(tail.torn),
                "torn_sha256": hashlib.sha256(tail.torn).hexdigest(),
                "seq": tail.seq + 1, "time": round(time.time(), 6), "prev": tail.hash}
        body["hash"] = record_hash(body)
        os.write(fd, canonical(body) + b"\n")
        return body["seq"], body["hash"]

    def _rotated_tail(self) -> tuple[int, str]:
        older = rotated_files(self.path)
        if not older:
            return -1, GENESIS
        fd = os.open(older[-1], os.O_RDONLY)
        try:
            tail = _tail_of(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        return (tail.seq, tail.hash) if tail is not None else (-1, GENESIS)

    def _rotate(self) -> None:
        older = rotated_files(self.path)
        number = int(ROTATED.search(older[-1].name).group(1)) + 1 if older else 1
        os.rename(self.path, self.path.with_name(f"{self.path.name}.{number:06d}"))
        self._known = None


@dataclass
class Verification:
    files: list[Path]
    records: int = 0
    first_seq: int | None = None
    last_hash: str = GENESIS
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: Path | str, *, rotated: bool = True) -> Verification:
    """Check FILE's chain (and its rotated predecessors', oldest first, when `rotated`)."""
    path = Path(path)
    files = (rotated_files(path) if rotated else []) + [path]
    result = Verification(files)
    prev_hash: str | None = None
    prev_seq: int | None = None
    torn_pending: tuple[str, bytes] | None = None  # (where, bytes) of a torn line awaiting its record
    for file in files:
        lines = file.read_bytes().split(b"\n")
        ends_clean = lines[-1] == b""
        if ends_clean:
            lines.pop()
        for number, raw in enumerate(lines, 1):
            where = f"{file.name}:{number}"
            try:
                body = json.loads(raw)
                assert isinstance(body, dict) and isinstance(body.get("seq"), int)
            except (ValueError, AssertionError):
                if torn_pending is not None:
                    result.problems.append(f"{torn_pending[0]}: unreadable line")
                torn_pending = (where, raw)
                continue
            if body.get("hash") != record_hash(body):
                result.problems.append(f"{where}: record seq {body['seq']} was changed (its hash does not match)")
            if torn_pending is not None:
                if body.get("kind") == "torn_line" and body.get("torn_sha256") == hashlib.sha256(
                        torn_pending[1]).hexdigest() and body.get("torn_bytes") == len(torn_pending[1]):
                    result.notes.append(f"{torn_pending[0]}: a torn line (a writer killed mid-record), "
                                        f"accounted for by seq {body['seq']}")
                else:
                    result.problems.append(f"{torn_pending[0]}: unreadable line")
                torn_pending = None
            if prev_hash is None:
                result.first_seq = body["seq"]
                if body["seq"] != 0:
                    result.notes.append(f"the chain starts at seq {body['seq']} (older files absent)")
            else:
                if body.get("prev") != prev_hash:
                    result.problems.append(f"{where}: record seq {body['seq']} does not follow seq {prev_seq} "
                                           f"(a record removed, inserted or reordered before it)")
                if body["seq"] != prev_seq + 1:
                    result.problems.append(f"{where}: seq {body['seq']} after seq {prev_seq}")
            prev_hash, prev_seq = body.get("hash"), body["seq"]
            result.records += 1
        if torn_pending is not None and not ends_clean and file == files[-1]:
            result.notes.append(f"{torn_pending[0]}: a torn last line not yet repaired (the next write or "
                                "start repairs it)")
            torn_pending = None
    if torn_pending is not None:
        result.problems.append(f"{torn_pending[0]}: unreadable line")
    result.last_hash = prev_hash or GENESIS
    return result
