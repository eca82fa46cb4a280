"""The request journal: requests in flight and just finished, in append-only files beside the database.

Why: a request must be on disk before it is forwarded (a crash must not lose what the provider
bills), and a finished request's exact usage must survive a crash too. A line copied into a
shared memory map of the segment file does both on the event loop without a system call (a
`write()` per line is a syscall, the GIL given up and retaken, twice a request); a database
commit would cost a thread round trip per request. The store then takes finished requests in
large batches, off the request path (`recording.Recorder`). Durability is the same as SQLite's
WAL with synchronous=NORMAL: the mapped pages are the file's page cache, so what was copied
survives a killed process (the kernel writes it back), not a power cut.

A segment's blocks are reserved (`posix_fallocate`) and written with zeros before it is mapped: a
full disk refuses the new segment with an OSError, where a store to an unbacked page would kill
the process (SIGBUS). The unused tail reads as NUL bytes, which recovery ignores; a sealed segment
is truncated to its lines. A process owns its segments through an exclusive `flock`, which the
kernel drops when the process dies (kill -9 included); the next start recovers every segment it
can lock. A segment is deleted once every request it mentions is in the store.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from gateway.store.base import RequestRecord
from gateway.timeutil import iso, parse_iso

log = logging.getLogger("gateway.journal")

SUFFIX = ".journal"
REJECTED = "rejected"  # the directory, beside the segments, of the lines the store refused
_ZEROS = bytes(1 << 16)  # a new segment is zeroed in pieces of this size (not a segment-sized buffer)


@dataclass(slots=True, eq=False)
class Segment:
    path: Path
    fd: int
    map: mmap.mmap  # closed once sealed
    capacity: int
    size: int = 0  # bytes of lines written
    pending: int = 0  # records written here whose request is not yet in the store
    sealed: bool = False  # no longer written; deleted when nothing is pending

    def seal(self) -> None:
        """No more lines here: unmap (the pages stay in the file) and cut the unused tail."""
        self.sealed = True
        if not self.map.closed:
            self.map.close()
            with contextlib.suppress(OSError):  # (a NUL tail is harmless: recovery skips it)
                os.ftruncate(self.fd, self.size)

    def discard(self) -> None:
        self.map.close()
        _close_and_unlink(self.path, self.fd)


def _new_segment(path: Path, capacity: int) -> Segment:
    """A new segment file, locked, its blocks taken and mapped. FileExistsError when `path` is
    taken (never another file's lines overwritten); other OSErrors when the disk cannot take it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.posix_fallocate(fd, 0, capacity)
        # Written, not only reserved: the first store to a page of a reserved-but-unwritten extent
        # takes a fault in which the filesystem maps the block, several times a page fault's cost.
        zeros = memoryview(_ZEROS)
        for at in range(0, capacity, len(zeros)):
            piece = zeros[: capacity - at]
            if os.pwrite(fd, piece, at) != len(piece):
                raise OSError(errno.ENOSPC, "journal segment cut short", str(path))
        return Segment(path, fd, mmap.mmap(fd, capacity), capacity)
    except BaseException:
        _close_and_unlink(path, fd)  # ours (O_EXCL); a failed fallocate may still hold blocks
        raise


class Journal:
    """Append-only, per-process. `directory=None` keeps nothing (an in-memory database)."""

    def __init__(self, directory: Path | None, owner: str, segment_bytes: int = 4 << 20) -> None:
        self.directory = directory
        self.owner = owner.replace("/", "-").replace(":", "-")
        self.segment_bytes = segment_bytes
        self._current: Segment | None = None
        self._segments: list[Segment] = []
        self._seq = 0

    def open(self) -> None:
        if self.directory is not None:
            try:
                self._roll()
            except OSError as exc:  # a full disk at start: serve, refusing billed requests until it frees
                log.error(
                    "journal %s: cannot start a segment (%s); billed requests get 503 until it can", self.directory, exc
                )

    def _roll(self, need: int = 0) -> Segment:
        """Start the next segment (big enough for a `need`-byte line), then seal the current one.
        Raises OSError, changing nothing, when the disk cannot take a new segment."""
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            self._seq += 1  # (a number that failed is not reused: its file may be someone's)
            path = self.directory / f"{self.owner}.{self._seq:06d}{SUFFIX}"
            try:
                seg = _new_segment(path, max(self.segment_bytes, need))
                break
            except FileExistsError:
                continue  # a file of a predecessor with the same owner id: left for recovery
        if self._current is not None:
            self._current.seal()
            self._release_idle()
        self._current = seg
        self._segments.append(seg)
        return seg

    def _append(self, line: bytes) -> Segment | None:
        seg = self._current
        if seg is None:
            if self.directory is None:
                return None  # nothing durable to journal for (an in-memory database)
            seg = self._roll(len(line))  # none could be made at start
        start = seg.size
        end = start + len(line)
        if end > seg.capacity:
            seg = self._roll(len(line))
            start, end = 0, len(line)
        seg.map[start:end] = line
        seg.size = end
        seg.pending += 1
        return seg

    def begin(self, r: RequestRecord) -> Segment | None:
        """Make the request durable before it is forwarded; raises OSError when the disk refuses."""
        return self._append(
            orjson.dumps(
                [
                    "B",
                    r.id,
                    r.user_id,
                    r.key_id,
                    r.provider,
                    r.model,
                    r.operation,
                    r.stream,
                    r.started_iso or iso(r.started_at),
                    r.reservation,
                    r.owner,
                ],
                option=orjson.OPT_APPEND_NEWLINE,
            )
        )

    def finish(self, r: RequestRecord) -> Segment | None:
        """Make the final usage durable before the store has it."""
        assert r.finished_at is not None
        return self._append(
            orjson.dumps(
                [
                    "F",
                    r.id,
                    r.status_code,
                    r.outcome,
                    r.usage,
                    r.usage_raw,
                    r.estimated,
                    r.finished_iso or iso(r.finished_at),
                ],
                option=orjson.OPT_APPEND_NEWLINE,
            )
        )

    def stored(self, segments: list[Segment | None]) -> None:
        """The records written to these segments are now in the store."""
        for seg in segments:
            if seg is not None:
                seg.pending -= 1
        self._release_idle()

    def _release_idle(self) -> None:
        for seg in [s for s in self._segments if s.sealed and s.pending <= 0]:
            self._segments.remove(seg)
            seg.discard()

    def close(self) -> None:
        """At shutdown, after the store has taken everything: segments with nothing pending go."""
        for seg in self._segments:
            seg.seal()
        self._release_idle()
        for seg in self._segments:  # something never reached the store: the next start recovers it
            log.warning("journal %s keeps %d record(s) for recovery at the next start", seg.path.name, seg.pending)
            os.close(seg.fd)
        self._segments.clear()
        self._current = None


def _close_and_unlink(path: Path, fd: int) -> None:
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@dataclass(slots=True)
class Orphans:
    """What dead processes left: requests to finish exactly, requests to settle by estimate."""

    finished: list[RequestRecord] = field(default_factory=list)
    unfinished: list[RequestRecord] = field(default_factory=list)
    files: list[tuple[Path, int]] = field(default_factory=list)  # locked by us until `discard`

    def discard(self) -> None:
        """Every orphan is in the store: the files can go."""
        for path, fd in self.files:
            _close_and_unlink(path, fd)
        self.files.clear()

    def quarantine(self, ids: Mapping[str, object]) -> None:
        """Set aside the lines of these requests (the store refuses them): appended, as written, to
        `rejected/<segment>.rejected` beside the segment, and synced before the segment may go. The
        file reads like a segment: moved back as `<name>.journal`, the next recovery replays it."""
        for path, _ in self.files:
            lines = [line for line in _lines(path.read_bytes()) if _request_id(line) in ids]
            if not lines:
                continue
            rejected = path.parent / REJECTED
            rejected.mkdir(exist_ok=True)
            with open(rejected / f"{path.name}.rejected", "ab") as fh:
                fh.write(b"".join(line + b"\n" for line in lines))
                fh.flush()
                os.fsync(fh.fileno())

    def release(self) -> None:
        """The store did not take them: unlock the files, kept for the next recovery."""
        for _, fd in self.files:
            os.close(fd)
        self.files.clear()


def orphans(directory: Path | None) -> Orphans:
    """Read the segments no live process holds (each stays locked by us until `discard`)."""
    found = Orphans()
    if directory is None or not directory.is_dir():
        return found
    begun: dict[str, RequestRecord] = {}
    # A request's begin and finish may sit in two segments of its owner: take all of an owner's
    # segments or none (one locked by someone else, even for a moment, skips the owner).
    by_owner: dict[str, list[Path]] = {}
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        by_owner.setdefault(path.name.rsplit(".", 2)[0], []).append(path)
    for paths in by_owner.values():
        locked: list[tuple[Path, int]] = []
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                break  # its owner (live) or another recovery deleted it since the listing
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # a live process writes it
                break
            locked.append((path, fd))
        else:
            found.files += locked
            continue
        for _, fd in locked:
            os.close(fd)
    for path, _ in found.files:
        for entry in entries(path):
            if entry[0] == "B":
                begun[str(entry[1])] = _begun(entry)
            elif entry[0] == "F" and (r := begun.pop(str(entry[1]), None)) is not None:
                # A finish whose begin is gone was stored already (a segment goes only when it is).
                _finish(r, entry)
                found.finished.append(r)
    found.unfinished = list(begun.values())
    return found


def entries(path: Path) -> Iterator[list[object]]:
    """The entries of a segment file, in order (a live process's too: its map is the file's page cache)."""
    with open(path, "rb") as fh:
        yield from _entries(fh.read(), path)


def _lines(data: bytes) -> list[bytes]:
    # The unwritten tail of a segment that was not sealed is NUL bytes.
    return data.rstrip(b"\0").splitlines()


def _request_id(line: bytes) -> str | None:
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return str(entry[1]) if isinstance(entry, list) and len(entry) > 1 else None


def _entries(data: bytes, path: Path) -> Iterator[list[object]]:
    for n, line in enumerate(_lines(data), 1):
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            # Only a write cut by the crash can be torn, and a torn begin was never forwarded.
            log.warning("journal %s line %d is torn; skipped", path.name, n)
            continue
        if isinstance(entry, list) and entry and entry[0] in ("B", "F"):
            yield entry


def _begun(e: list[object]) -> RequestRecord:
    return RequestRecord(
        id=str(e[1]),
        user_id=str(e[2]),
        key_id=str(e[3]),
        provider=str(e[4]),
        model=str(e[5]),
        operation=str(e[6]),
        stream=bool(e[7]),
        started_at=parse_iso(str(e[8])),
        reservation=dict(e[9]),  # type: ignore[call-overload]
        owner=str(e[10]),
    )


def _finish(r: RequestRecord, e: list[object]) -> None:
    r.status_code = e[2]  # type: ignore[assignment]
    r.outcome = str(e[3])
    r.usage = dict(e[4])  # type: ignore[call-overload]
    r.usage_raw = e[5]
    r.estimated = bool(e[6])
    r.finished_at = parse_iso(str(e[7]))


def _segments_of(directory: Path, owner: str) -> list[Path]:
    prefix = owner.replace("/", "-").replace(":", "-") + "."
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.name.startswith(prefix) and p.name.endswith(SUFFIX)]


def left(directory: Path, owner: str) -> bool:
    """Whether any segment of `owner`'s journal is still here (a recovery deletes what it stored)."""
    return bool(_segments_of(directory, owner))


def held(directory: Path, owner: str) -> bool:
    """Whether a live process holds a segment of `owner`'s journal here (the kernel drops a dead
    process's flock, so this tells a dead owner from one that is only slow)."""
    for path in _segments_of(directory, owner):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # (closing drops our lock)
    return False
