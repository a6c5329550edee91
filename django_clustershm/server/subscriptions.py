"""Who listens to what, in the Manager: subscriptions by key and by prefix.

Pure bookkeeping, like :mod:`.locktable`. The engine calls :meth:`notify` for
every change of the store or a cache (set, remove, expire, evict, clear);
each matching subscription gets ``session.push((sub_id, ns, key, event,
value))``, in the order of the changes, which the transport turns into a
PUSH_EVENT frame (or an in-process queue item, embedded).
"""

from __future__ import annotations

from ..exceptions import LimitExceeded
from ..wire.frames import EVENT_SET, EVENT_TOUCH

#: Subscriptions one session may hold.
MAX_SUBSCRIPTIONS_PER_SESSION = 1024


class Subscriptions:
    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], dict[tuple[int, int], object]] = {}
        self._prefixes: dict[str, list[tuple[str, object, int]]] = {}
        self._by_session: dict[int, dict[int, tuple[str, str, bool]]] = {}
        self.count = 0
        self.pushed = 0

    def add(self, session, sub_id: int, ns: str, key: str, prefix: bool) -> None:
        subs = self._by_session.setdefault(session.id, {})
        if sub_id in subs:
            self.remove(session, sub_id)
        if len(subs) >= MAX_SUBSCRIPTIONS_PER_SESSION:
            raise LimitExceeded(f"this connection already holds {len(subs)} subscriptions")
        subs[sub_id] = (ns, key, prefix)
        if prefix:
            self._prefixes.setdefault(ns, []).append((key, session, sub_id))
        else:
            self._by_key.setdefault((ns, key), {})[(session.id, sub_id)] = session
        self.count += 1

    def remove(self, session, sub_id: int) -> bool:
        subs = self._by_session.get(session.id)
        if not subs or sub_id not in subs:
            return False
        ns, key, prefix = subs.pop(sub_id)
        if prefix:
            remaining = [p for p in self._prefixes[ns] if not (p[1] is session and p[2] == sub_id)]
            if remaining:
                self._prefixes[ns] = remaining
            else:
                del self._prefixes[ns]
        else:
            targets = self._by_key[(ns, key)]
            del targets[(session.id, sub_id)]
            if not targets:
                del self._by_key[(ns, key)]
        self.count -= 1
        return True

    def drop_session(self, session) -> None:
        for sub_id in list(self._by_session.get(session.id, ())):
            self.remove(session, sub_id)
        self._by_session.pop(session.id, None)

    def notify(self, ns: str, event: int, key: str | None, value) -> None:
        if not self.count or event == EVENT_TOUCH:
            return
        if event != EVENT_SET:
            value = None
        if key is None:  # clear: every subscription of the namespace hears it
            for (sub_ns, _), targets in list(self._by_key.items()):
                if sub_ns == ns:
                    for (_, sub_id), session in list(targets.items()):
                        self._push(session, (sub_id, ns, None, event, None))
            for _, session, sub_id in list(self._prefixes.get(ns, ())):
                self._push(session, (sub_id, ns, None, event, None))
            return
        by_key = self._by_key.get((ns, key))
        if by_key:
            for (_, sub_id), session in list(by_key.items()):
                self._push(session, (sub_id, ns, key, event, value))
        prefixes = self._prefixes.get(ns)
        if prefixes:
            for prefix, session, sub_id in prefixes:
                if key.startswith(prefix):
                    self._push(session, (sub_id, ns, key, event, value))

    def _push(self, session, event: tuple) -> None:
        push = session.push
        if push is not None:
            self.pushed += 1
            push(event)

    def describe(self) -> dict:
        return {
            "subscriptions": self.count,
            "pushed": self.pushed,
            "by_pid": {str(pid): n for pid, n in _count_by_pid(self._by_key, self._prefixes).items()},
        }


def _count_by_pid(by_key, prefixes) -> dict:
    counts: dict[int, int] = {}
    for targets in by_key.values():
        for session in targets.values():
            counts[session.pid] = counts.get(session.pid, 0) + 1
    for entries in prefixes.values():
        for _, session, _ in entries:
            counts[session.pid] = counts.get(session.pid, 0) + 1
    return counts
