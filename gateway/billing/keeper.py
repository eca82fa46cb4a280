"""The lease keeper: one background task per process beside a `LeasedLedger`.

Every `poll` seconds it looks at the invalidation log (limits changed, key revoked, balance
recalled) and hands back what recalled users left idle; every `heartbeat` seconds it renews this
process's registration, returns idle leases of quiet users and settles dead processes. It reads
the log only when the store's watch says it moved (no round trip: a signal file, a LISTEN), and
at every heartbeat regardless, should a signal have been lost: a store round trip 20 times a
second per process cost more than everything else the keeper does.

A dead process (heartbeat older than `stale` seconds, on the store's clock: hosts may disagree on
the time, not on the database's) is settled by one live process at a time
(`claim_process`). On the same host its journal is visible: if a live process still holds it (flock)
the owner is only slow and is left alone; otherwise the journal is recovered into the store
first (which takes the recovered usage off the dead owner's leases), then its leases are
released. A process on another host is released on heartbeat expiry alone: its own host
recovers its journal at its next start, and what was in flight there may be granted twice
meanwhile (and is lost for good with that disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from gateway.billing.leases import LeasedLedger
from gateway.journal import held, left
from gateway.settings import Settings
from gateway.store.base import Store
from gateway.store.leases_base import Invalidation, InvalidationKind, InvalidationWatch, LeaseStore

log = logging.getLogger("gateway.leases")

_PRUNE_EVERY = 60.0  # seconds between prunes of the invalidation log
_KEEP_LOG = 600.0  # seconds the invalidation log is kept: far longer than any poll gap
_LOOKBACK = 2.0  # seconds: re-read window for entries whose insert committed late


class LeaseKeeper:
    def __init__(
        self,
        ledger: LeasedLedger,
        store: LeaseStore,
        *,
        journal_dir: Path | None,
        recover: Callable[[Path], Awaitable[object]] | None = None,
        on_invalidation: Callable[[Invalidation], None] | None = None,
        on_dead: Callable[[str], Awaitable[object]] | None = None,
        poll: float = 0.05,
        heartbeat: float = 1.0,
        stale: float = 10.0,
        idle: float = 1.0,
        host: str | None = None,
    ) -> None:
        self.ledger = ledger
        self.store = store
        self.owner = ledger.owner
        self.journal_dir = journal_dir
        self.recover = recover  # stores the orphans of a journal directory (`recording.recover_journal`)
        self.on_invalidation = on_invalidation  # limits/key entries, after the ledger's own invalidate
        self.on_dead = on_dead  # with a dead process's owner id, after its leases went (its sync claims)
        self.poll = poll
        self.heartbeat = heartbeat
        self.stale = stale
        self.idle = idle
        self.host = host or socket.gethostname()
        self._seq = 0
        self._seen: dict[int, float] = {}  # recent entries handled: seq -> monotonic time
        self._task: asyncio.Task[None] | None = None
        self._settling: asyncio.Task[object] | None = None  # settle_dead beside the rounds
        self._next_beat = 0.0
        self._next_prune = 0.0
        self._watch: InvalidationWatch | None = None
        self._mark: object | None = None  # the watch's mark when the log was last read

    async def start(self) -> None:
        """Register and settle dead processes once, then keep in the background. Call after the
        journal is open (a live process is told from a dead one by its journal's lock)."""
        journal = str(self.journal_dir.resolve()) if self.journal_dir is not None else ""
        sent = self.ledger.fence_clock()
        await self.store.register_process(self.owner, self.host, os.getpid(), journal)
        self.ledger.beat(sent)
        self._watch = await self.store.watch_invalidations()
        self._mark = self._watch.mark()
        self._seq = await self.store.last_invalidation()
        await self.settle_dead()
        self._next_beat = time.monotonic() + self.heartbeat
        self._task = asyncio.create_task(self._run(), name="lease-keeper")

    async def close(self) -> None:
        """At shutdown, after the recorder has stored what it could: leases go back, except what
        covers requests left to the journal (the next process recovers them, then releases)."""
        for task in (self._task, self._settling):
            if task is not None:
                task.cancel()  # (a recovery cut short unlocks its files: another process takes it over)
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._settling = None
        if self._watch is not None:
            await self._watch.close()
            self._watch = None
        kept = await self.ledger.release_all()
        await self.store.stop_process(self.owner, keep=kept > 0)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            try:
                await self.tick()
            except Exception:  # the store is down or locked: the next round tries again
                log.exception("lease keeper round failed")
                await asyncio.sleep(self.heartbeat)

    async def tick(self) -> None:
        now = time.monotonic()
        beat = now >= self._next_beat
        if beat:  # first: a round whose other work fails must not stop the heartbeats (the fence)
            self._next_beat = now + self.heartbeat
            await self.beat()
        mark = self._watch.mark() if self._watch is not None else None
        if beat or mark is None or mark != self._mark:
            await self._read_log(now)
            self._mark = mark  # (taken before the read: an entry added during it moves the next mark)
        await self.ledger.keep(self.idle, scan=beat)
        if beat:
            self._settle_beside()
            self._seen = {seq: at for seq, at in self._seen.items() if now - at < 2 * _LOOKBACK}
        if now >= self._next_prune:
            self._next_prune = now + _PRUNE_EVERY
            await self.store.prune_invalidations(_KEEP_LOG)

    def _settle_beside(self) -> None:
        """Settle dead processes in a task of its own, one at a time: recovering a dead process's
        journal may take longer than the stale age, and this process's heartbeats must go on
        meanwhile (else its own fence lapses, and others may take it for dead)."""
        if self._settling is None or self._settling.done():
            self._settling = asyncio.create_task(self._settle_logged(), name="settle-dead")

    async def _settle_logged(self) -> object:
        try:
            return await self.settle_dead()
        except Exception:  # the store is down or locked: the next heartbeat's round tries again
            log.exception("settling stopped processes failed")
            return None

    async def beat(self) -> None:
        """One heartbeat, as a round begins with; a process taken for dead registers again."""
        sent = self.ledger.fence_clock()
        if not await self.store.heartbeat(self.owner):
            log.error("this process was taken for dead (no heartbeat for %.0f s); re-registering", self.stale)
            journal = str(self.journal_dir.resolve()) if self.journal_dir is not None else ""
            await self.store.register_process(self.owner, self.host, os.getpid(), journal)
            await self.ledger.reassert()
            # Away that long, log entries meant for it may be pruned unread: reload every limit.
            for u in self.ledger.users():
                self.ledger.invalidate(u.quota.user_id)
        self.ledger.beat(sent)  # (after a re-registration too: it is later than `sent`)

    async def _read_log(self, now: float) -> None:
        for inv in await self.store.invalidations_after(self._seq, _LOOKBACK):
            if inv.seq in self._seen:
                continue
            self._seen[inv.seq] = now
            self._seq = max(self._seq, inv.seq)
            if inv.kind == InvalidationKind.RECALL:
                if inv.seq not in self.ledger.my_recalls:
                    await self.ledger.answer_recall(inv.subject, inv.seq)
                continue
            if inv.kind == InvalidationKind.LIMITS:
                self.ledger.invalidate(inv.subject)
            if self.on_invalidation is not None:
                self.on_invalidation(inv)

    async def settle_dead(self) -> list[str]:
        """Release the leases of dead processes; returns their owner ids."""
        released: list[str] = []
        for p in await self.store.stale_processes(self.owner, self.stale):
            local = p.host == self.host and bool(p.journal)
            if local and held(Path(p.journal), p.owner):
                continue  # alive (its journal is locked), only slow to beat or about to exit
            claim = await self.store.claim_process(p.owner, self.stale)
            if claim is None:
                continue  # it beat again, or another process settles it
            if local and self.recover is not None:
                await self.recover(Path(p.journal))
                if left(Path(p.journal), p.owner):
                    # Another process held a segment of it while we read (a restarted worker
                    # recovering it at its start, a `held` probe): its usage may not be stored yet,
                    # and its leases cover it. Our claim lapses: a later round settles it.
                    continue
            rows = await self.store.release_owner(p.owner, claim)
            if rows is None:  # it beat after the claim: cut off for a while, alive, spending its leases
                log.warning("process %s beat again while being taken for dead: left alone", p.owner)
                continue
            if self.on_dead is not None:
                await self.on_dead(p.owner)
            log.warning("released %d lease(s) of stopped process %s", rows, p.owner)
            released.append(p.owner)
        return released


def shared_quota(
    settings: Settings,
    store: Store,
    leases: LeaseStore,
    owner: str,
    *,
    journal_dir: Path | None,
    recover: Callable[[Path], Awaitable[object]] | None,
    on_invalidation: Callable[[Invalidation], None] | None,
    on_dead: Callable[[str], Awaitable[object]] | None = None,
) -> tuple[LeasedLedger, LeaseKeeper]:
    """The shared ledger and its keeper, configured from the settings."""
    ledger = LeasedLedger(
        store,
        leases,
        owner,
        settings.file.plan,
        fraction=settings.lease_fraction,
        recall_wait=settings.lease_recall_wait_seconds,
        poll=settings.keeper_poll_seconds,
        stale_seconds=settings.heartbeat_stale_seconds,
    )
    keeper = LeaseKeeper(
        ledger,
        leases,
        journal_dir=journal_dir,
        recover=recover,
        on_invalidation=on_invalidation,
        on_dead=on_dead,
        poll=settings.keeper_poll_seconds,
        heartbeat=settings.heartbeat_seconds,
        stale=settings.heartbeat_stale_seconds,
        idle=settings.lease_idle_seconds,
    )
    return ledger, keeper
