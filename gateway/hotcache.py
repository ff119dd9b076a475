"""What the attestation hot path reads, kept while the SQLite database provably has not changed.

Each attestation's write transaction reads the device's appraisal snapshot (the device, the
manufacturer CAs, reference values, epoch, assignment, release and policy) and the ledger head.
On SQLite all of that stays as it was for as long as nothing is committed, and
``db.ChangeMark`` tells exactly that: ``RegistryHooks`` keeps the snapshots and the head under
the mark of the transaction that read them (advanced past that transaction's own writes), and
uses them only while the next transaction opens at the same mark. Any commit by anyone else
(another gateway process, a CLI command, another connection of this process) and any other write
on this connection moves the mark, and everything kept is dropped. The hot path's own writes
leave what is kept as it was, except two, which are applied: the ledger head becomes the last
entry appended, and a device whose counters were raised is dropped.

On PostgreSQL there is no mark (``db.change_mark`` gives None): nothing is kept, every
transaction reads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Final

from gateway.db import ChangeMark
from gateway.ledger import LedgerHead
from gateway.registry import AppraisalSnapshot
from protocol.ids import DeviceId

#: Appraisal snapshots kept (least recently used dropped first): about 3.6 kB each for a device
#: with two certificates, one CA and two reference values, so ~36 MB when full.
SNAPSHOT_CACHE_SIZE: Final = 10_000


class SnapshotCache:
    """Appraisal snapshots and the ledger head under one ``ChangeMark``; see the module.

    Every method takes the mark its transaction opened at, and does nothing (or finds nothing)
    unless it is the cache's mark: two threads on two connections only ever empty it.
    """

    __slots__ = ("_head", "_lock", "_mark", "_size", "_snapshots")

    def __init__(self, size: int = SNAPSHOT_CACHE_SIZE) -> None:
        """An empty cache of at most ``size`` snapshots."""
        self._size = size
        self._mark: ChangeMark | None = None
        self._head: LedgerHead | None = None
        self._snapshots: OrderedDict[DeviceId, AppraisalSnapshot] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, mark: ChangeMark | None) -> None:
        """A write transaction starts at ``mark``: drop everything if the database moved since
        the mark kept (or there is no mark)."""
        with self._lock:
            if mark is None or mark != self._mark:
                self._drop()
            self._mark = mark

    def snapshot(self, mark: ChangeMark | None, device: DeviceId) -> AppraisalSnapshot | None:
        """The snapshot kept for ``device``, valid at ``mark``; None when none is."""
        with self._lock:
            if mark is None or mark != self._mark:
                return None
            found = self._snapshots.get(device)
            if found is not None:
                self._snapshots.move_to_end(device)
            return found

    def keep_snapshot(self, mark: ChangeMark | None, snapshot: AppraisalSnapshot) -> None:
        """Keep ``snapshot``, read in the transaction opened at ``mark``."""
        with self._lock:
            if mark is None or mark != self._mark:
                return
            self._snapshots[snapshot.device.device_id] = snapshot
            while len(self._snapshots) > self._size:
                self._snapshots.popitem(last=False)

    def head(self, mark: ChangeMark | None) -> LedgerHead | None:
        """The ledger head kept, valid at ``mark``; None when none is."""
        with self._lock:
            if mark is None or mark != self._mark:
                return None
            return self._head

    def committed(
        self,
        opened: ChangeMark | None,
        after: ChangeMark | None,
        *,
        head: LedgerHead | None,
        changed: DeviceId | None,
    ) -> None:
        """The transaction opened at ``opened`` committed and left the database at ``after``,
        with ``head`` as the ledger's head (None: unknown) and the row of device ``changed``
        written (None: no device row written)."""
        with self._lock:
            if opened is None or after is None or opened != self._mark:
                self._drop()
                self._mark = None
                return
            self._mark = after
            self._head = head
            if changed is not None:
                self._snapshots.pop(changed, None)

    def forget(self) -> None:
        """Drop everything (a transaction failed: what it did is unknown)."""
        with self._lock:
            self._drop()
            self._mark = None

    def __len__(self) -> int:
        """How many snapshots are kept."""
        with self._lock:
            return len(self._snapshots)

    def _drop(self) -> None:
        self._snapshots.clear()
        self._head = None
