"""Who listens to what, in the Manager: subscriptions by key and by prefix.

Pure bookkeeping, like :mod:`.locktable`. The engine calls :meth:`notify` for
every change of the store or a cache (set, remove, expire, evict, clear);
each matching subscription gets ``session.push((sub_id, ns, key, event,
value))``, in the order of the changes, which the transport turns into a
PUSH_EVENT frame (or an in-process queue item, embedded).
"""

from __future__ import annotations

from typing import Any

from ..exceptions import LimitExceeded
from ..wire.frames import EVENT_SET, EVENT_TOUCH

#: Subscriptions one session may hold.
MAX_SUBSCRIPTIONS_PER_SESSION = 1024

_SUB_RANGE = 1 << 64
_SUB_MASK = _SUB_RANGE - 1
_SUB_SIGN = 1 << 63


def _target(sid: int, sub_id: int) -> int:
    """One int for (session id, sub_id): sub_id is a signed 64-bit int (the wire's)."""
    return sid << 64 | (sub_id & _SUB_MASK)


class Subscriptions:
    """Subscriptions by exact key and by prefix, per namespace.

    A write looks its key up once in the exact index, and once per distinct
    prefix *length* in the prefix index (``key[:n]`` in a dict), never
    scanning the subscriptions: 49,000 prefix subscriptions used to make a
    write 182x slower. Adding and removing one is O(1).

    The indexes hold ints only, ``{session id << 64 | sub_id: None}`` per
    key or prefix, never a session, a tuple or a nested dict: CPython does not
    track such dicts, so 10,000 prefix listeners are 10,000 entries of one
    dict for a full garbage collection to look at, not 10,000 objects (see
    :mod:`.gcpolicy`).
    """

    def __init__(self) -> None:
        # ns -> key -> {_target(session id, sub_id): None}
        self._exact: dict[str, dict[str, dict[int, None]]] = {}
        # ns -> prefix -> {_target(session id, sub_id): None}
        self._prefixed: dict[str, dict[str, dict[int, None]]] = {}
        # ns -> {prefix length: how many distinct prefixes have it}
        self._lengths: dict[str, dict[int, int]] = {}
        # session id -> (session, {sub_id: (ns, key, prefix)})
        self._by_session: dict[int, tuple[Any, dict[int, tuple[str, str, bool]]]] = {}
        self.count = 0
        self.pushed = 0

    def add(self, session, sub_id: int, ns: str, key: str, prefix: bool) -> None:
        self.remove(session, sub_id)  # the same sub_id again replaces it
        entry = self._by_session.get(session.id)
        if entry is None:
            entry = self._by_session[session.id] = (session, {})
        subs = entry[1]
        if len(subs) >= MAX_SUBSCRIPTIONS_PER_SESSION:
            raise LimitExceeded(f"this connection already holds {len(subs)} subscriptions")
        subs[sub_id] = (ns, key, prefix)
        index = (self._prefixed if prefix else self._exact).setdefault(ns, {})
        targets = index.get(key)
        if targets is None:
            targets = index[key] = {}
            if prefix:
                lengths = self._lengths.setdefault(ns, {})
                lengths[len(key)] = lengths.get(len(key), 0) + 1
        targets[_target(session.id, sub_id)] = None
        self.count += 1

    def remove(self, session, sub_id: int) -> bool:
        entry = self._by_session.get(session.id)
        if entry is None or sub_id not in entry[1]:
            return False
        ns, key, prefix = entry[1].pop(sub_id)
        if not entry[1]:
            del self._by_session[session.id]
        index = (self._prefixed if prefix else self._exact)[ns]
        targets = index[key]
        del targets[_target(session.id, sub_id)]
        if not targets:
            del index[key]
            if not index:
                del (self._prefixed if prefix else self._exact)[ns]
            if prefix:
                lengths = self._lengths[ns]
                lengths[len(key)] -= 1
                if not lengths[len(key)]:
                    del lengths[len(key)]
                    if not lengths:
                        del self._lengths[ns]
        self.count -= 1
        return True

    def drop_session(self, session) -> None:
        entry = self._by_session.get(session.id)
        if entry is not None:
            for sub_id in list(entry[1]):
                self.remove(session, sub_id)

    def notify(self, ns: str, event: int, key: str | None, value) -> None:
        if not self.count or event == EVENT_TOUCH:
            return
        if event != EVENT_SET:
            value = None
        if key is None:  # clear: every subscription of the namespace hears it
            for index in (self._exact.get(ns), self._prefixed.get(ns)):
                if index:
                    for targets in list(index.values()):
                        self._push_all(targets, (ns, None, event, None))
            return
        exact = self._exact.get(ns)
        if exact:
            found = exact.get(key)
            if found:
                self._push_all(found, (ns, key, event, value))
        lengths = self._lengths.get(ns)
        if lengths:
            prefixed = self._prefixed[ns]
            size = len(key)
            for length in lengths:
                if length <= size:
                    found = prefixed.get(key[:length])
                    if found:
                        self._push_all(found, (ns, key, event, value))

    def _push_all(self, targets: dict[int, None], event: tuple) -> None:
        """Push ``event`` (without its sub_id) to every subscription of ``targets``."""
        by_session = self._by_session
        for target in list(targets):
            sub_id = target & _SUB_MASK
            if sub_id >= _SUB_SIGN:
                sub_id -= _SUB_RANGE
            push = by_session[target >> 64][0].push
            if push is not None:
                self.pushed += 1
                push((sub_id, *event))

    def describe(self) -> dict:
        return {
            "subscriptions": self.count,
            "pushed": self.pushed,
            "by_pid": _count_by_pid(self._by_session),
        }


def _count_by_pid(by_session) -> dict:
    counts: dict[str, int] = {}
    for session, subs in by_session.values():
        pid = str(session.pid)
        counts[pid] = counts.get(pid, 0) + len(subs)
    return counts
