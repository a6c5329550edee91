"""Glob patterns and key-space scans: KEYS_MATCH, SCAN and SCAN_DELETE (#17).

**Patterns** follow Redis's glob rules (what django-redis's ``keys``,
``iter_keys`` and ``delete_pattern`` send to Redis): ``*`` any run of
characters, ``?`` one character, ``[abc]``/``[a-z]`` one of a set,
``[^abc]`` one not in it, ``\\`` makes the next character literal (also
inside a set). A pattern is compiled once (an LRU of the last 256) into the
cheapest test that decides it: equality, ``startswith``, or a regular
expression built so that it cannot backtrack exponentially: every run
between two stars has a fixed length, so matching it at its leftmost place
is never worse than later, and it is matched that way, atomically (the
lookahead-and-backreference form ``fnmatch`` used before Python 3.11 had
atomic groups). A rogue ``a*a*a*...b`` costs the Manager linear time per key,
not exponential.

**Scans.** A SCAN cursor must survive writes between its calls, and Python's
dict cannot resume an iteration once it has changed size, nor be indexed by
position. So a scan walks a **snapshot of its namespace's keys**: the keys
present when the scan started, each once. Each call looks at the next
``max(count, SCAN_EXAMINE)`` keys of the snapshot at most, and returns (or
removes) those that still exist, have not expired and match. Hence Redis's
guarantee, and a little more: a key present for the whole scan is in the
snapshot and still there when its turn comes, so it is returned, exactly
once (a snapshot has no duplicates); a key added meanwhile is not returned,
one removed meanwhile is not either once its turn comes. The alternatives
were worse here: Redis's reverse-binary cursor needs access to the hash
table's buckets (a second index on every key would cost every write and 20+
bytes a key, for a rare operation), and an insertion-order position shifts
under removals (keys present throughout would be skipped).

**The snapshot is copied in bounded steps** (#12). It was one C-level copy of
the key references when the scan started: 15-25 ms of the Manager's loop per
million keys. A namespace of up to :data:`SNAPSHOT_CHUNK` keys is still
copied in the first call (about a millisecond at most). A larger one is
*frozen* (:meth:`~.namespace.Namespace.freeze`): its dict stops changing and
an overlay takes the writes (:class:`~.namespace.Overlay`), so that the copy
can walk the dict :data:`SNAPSHOT_CHUNK` keys at a time, one chunk per loop
round (``Engine.tick()``, and a call that has nothing left to walk copies
the next one itself), and get exactly the keys of the moment it started;
then the overlay's changes go back into the dict. One copy per namespace
at a time: a scan that starts while another one's copy is under way waits
for it (its calls return no keys and its cursor meanwhile, as Redis's may),
then makes its own. The chunks are tuples: once a young garbage collection
has seen one, a full collection never visits its references again (a list
of a million references cost 22 ms of every full collection).

The state is bounded. A scan that ends within its first call keeps nothing.
Otherwise the Manager keeps it (by cursor: a scan may go on from another
connection of the same client, a generator passed to another thread) until
it ends, and lets the chunks already walked go as it goes.
Limits: :data:`SCANS_PER_SESSION` open scans per connection (a new one drops
that connection's least recently used: an abandoned ``iter_keys`` generator
costs nothing for long), :data:`MAX_SCANS` in all, and
:data:`MAX_SCAN_REFS` key references in all (a scan counts its namespace's
size when it starts); past those, scans idle for :data:`SCAN_IDLE` seconds
are dropped, and if that is not enough the new scan is refused
(:class:`LimitExceeded`). A closed connection's scans go with it (and so
does a copy under way: the namespace is thawed). A dropped cursor is
refused with an error naming the reason.
"""

from __future__ import annotations

import operator
import re
from collections import deque
from collections.abc import Callable, Iterator
from functools import lru_cache
from itertools import islice
from typing import Any, TypeAlias

from ..exceptions import InvalidArgument, LimitExceeded

#: Snapshot entries one SCAN call looks at, at least (``count`` if larger):
#: about 0.3 ms of the Manager's loop.
SCAN_EXAMINE = 1024
#: The most keys one SCAN reply holds (a larger ``count`` is capped).
MAX_SCAN_COUNT = 10_000
#: Open scans one connection may keep; a new one drops its least recently used.
SCANS_PER_SESSION = 16
#: Open scans the Manager keeps in all.
MAX_SCANS = 4096
#: Key references all open scans hold together (8 bytes each: 128 MiB).
MAX_SCAN_REFS = 2**24
#: Seconds without a call after which a scan may be dropped to make room.
SCAN_IDLE = 60.0
#: Keys a snapshot copies in one step (a C-level copy of references, about
#: 20-30 ns a key on a 2-vCPU VM: under a millisecond of the loop).
SNAPSHOT_CHUNK = 32768

#: A test of a key (truthy: it matches); None: every key matches.
Matcher: TypeAlias = "Callable[[str], object] | None"


# -- patterns --------------------------------------------------------------------------


def _parse(pattern: str) -> list:
    """The pattern as a list of atoms: None for ``*`` (runs collapsed), else a regex of one character."""
    atoms: list = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if not atoms or atoms[-1] is not None:
                atoms.append(None)
            i += 1
        elif c == "?":
            atoms.append(".")
            i += 1
        elif c == "\\" and i + 1 < n:
            atoms.append(re.escape(pattern[i + 1]))
            i += 2
        elif c == "[":
            atom, i = _parse_set(pattern, i + 1)
            atoms.append(atom)
        else:
            atoms.append(re.escape(c))
            i += 1
    return atoms


def _parse_set(pattern: str, i: int) -> tuple[str, int]:
    """``[...]`` from just after its ``[``, as Redis's stringmatchlen reads it
    (an unclosed set runs to the end of the pattern; ``a-z`` with its ends in
    either order); returns the atom and where the pattern goes on."""
    n = len(pattern)
    negate = i < n and pattern[i] == "^"
    if negate:
        i += 1
    items: list[str] = []
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            items.append(re.escape(pattern[i + 1]))
            i += 2
        elif c == "]":
            i += 1
            break
        elif i + 2 < n and pattern[i + 1] == "-":
            low, high = sorted((c, pattern[i + 2]))
            items.append(f"{re.escape(low)}-{re.escape(high)}")
            i += 3
        else:
            items.append(re.escape(c))
            i += 1
    if not items:
        return ("." if negate else "(?!)"), i
    return f"[{'^' if negate else ''}{''.join(items)}]", i


def _literal(atoms: list) -> str | None:
    """The text a run of atoms matches if they are all literal characters, else None."""
    text = []
    for atom in atoms:
        if atom is None or atom == "." or atom.startswith(("[", "(")):
            return None
        text.append(atom[1:] if atom.startswith("\\") else atom)
    return "".join(text)


@lru_cache(maxsize=256)
def compile_glob(pattern: str) -> Matcher:
    """A test of a key against ``pattern`` (truthy: it matches); None matches everything."""
    atoms = _parse(pattern)
    if atoms == [None]:
        return None
    literal = _literal(atoms)
    if literal is not None:
        return literal.__eq__
    if atoms[-1] is None and None not in atoms[:-1]:
        head = _literal(atoms[:-1])
        if head is not None:
            return operator.methodcaller("startswith", head)
    # Runs of fixed-width atoms between stars: the first anchored at the
    # start, the last at the end, each one between matched at its leftmost
    # place and never revisited (lookahead + backreference: an atomic group).
    runs: list[list[str]] = [[]]
    for atom in atoms:
        if atom is None:
            runs.append([])
        else:
            runs[-1].append(atom)
    parts = ["".join(runs[0])]
    for index, run in enumerate(runs[1:-1], 1):
        parts.append(f"(?=(?P<g{index}>.*?{''.join(run)}))(?P=g{index})")
    if len(runs) > 1:
        parts.append(".*" + "".join(runs[-1]))
    return re.compile("".join(parts) + r"\Z", re.DOTALL).match


# -- scans -----------------------------------------------------------------------------


class Scan:
    """One open scan: its snapshot of keys (chunks of it) and how far it has walked."""

    __slots__ = (
        "chunks",
        "copy",
        "cursor",
        "ns",
        "offset",
        "pattern",
        "refs",
        "session_id",
        "space",
        "started",
        "used",
    )

    def __init__(self, cursor: int, session_id: int, space, ns: str, pattern: str, refs: int, used: float) -> None:
        self.cursor = cursor
        self.session_id = session_id
        self.space = space
        self.ns = ns
        self.pattern = pattern
        #: the snapshot still to walk, in chunks (tuples of keys), from chunks[0][offset]
        self.chunks: deque[tuple] = deque()
        self.offset = 0
        #: the iterator over the frozen namespace's keys while the copy is under way
        self.copy: Iterator[str] | None = None
        #: whether its copy has started (False: it waits for another scan's copy of the same namespace)
        self.started = False
        #: key references it counts against MAX_SCAN_REFS
        self.refs = refs
        self.used = used

    @property
    def done(self) -> bool:
        return self.started and self.copy is None and not self.chunks


class Scans:
    """The open scans of a Manager, by cursor, least recently used first."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.open: dict[int, Scan] = {}
        #: session id -> {cursor: scan}, least recently used first
        self.by_session: dict[int, dict[int, Scan]] = {}
        #: namespace -> the scan whose snapshot is being copied from it (one at a time)
        self.copying: dict[Any, Scan] = {}
        #: namespace -> scans waiting to copy theirs, in the order they started
        self.waiting: dict[Any, deque[Scan]] = {}
        #: key references the open scans hold
        self.refs = 0
        self._next = 1
        self.started = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self.open)

    def describe(self) -> dict:
        return {
            "open": len(self.open),
            "refs": self.refs,
            "started": self.started,
            "dropped": self.dropped,
            "copying": len(self.copying),
        }

    def step(self, session_id: int, space, ns: str, cursor: int, pattern: str, count: int) -> tuple[int, list[str]]:
        """One SCAN call on namespace ``space``: (the next cursor, 0 at the end; the keys found)."""
        count = min(count, MAX_SCAN_COUNT)
        examine = max(count, SCAN_EXAMINE)
        match = compile_glob(pattern)
        if cursor == 0:
            self.started += 1
            if len(space) <= SNAPSHOT_CHUNK and not space.frozen:
                keys = tuple(space.iter_keys())  # small: one copy, now
                found, pos = space.scan_batch(keys, 0, examine, count, match)
                if pos >= len(keys):
                    return 0, found  # done in one call: nothing to keep
                scan = self._admit(session_id, space, ns, pattern, len(keys))
                scan.chunks.append(keys)
                scan.offset = pos
                scan.started = True
                return scan.cursor, found
            scan = self._admit(session_id, space, ns, pattern, len(space))
            queue = self.waiting.setdefault(space, deque())
            queue.append(scan)
            if space not in self.copying:
                self._start_next(space)
        else:
            scan = self._resume(cursor, ns, pattern)
        found = self._walk(scan, examine, count, match)
        if scan.done:
            self._drop(scan)
            return 0, found
        return scan.cursor, found

    def tick(self) -> None:
        """Copy one chunk of one snapshot under way (the loop calls it every round while any is)."""
        if self.copying:
            space = next(iter(self.copying))
            scan = self.copying.pop(space)
            self.copying[space] = scan  # round robin between namespaces
            self._copy(scan)

    def _walk(self, scan: Scan, examine: int, count: int, match) -> list[str]:
        """Look at up to ``examine`` keys of the snapshot (copying one more
        chunk, at most, if none is left), collecting up to ``count``."""
        found: list[str] = []
        copied = False
        chunks, space = scan.chunks, scan.space
        while examine > 0 and len(found) < count:
            if not chunks:
                if scan.copy is None or copied:
                    break  # done, waiting for its turn, or this call copied its share
                self._copy(scan)
                copied = True
                continue
            chunk = chunks[0]
            got, pos = space.scan_batch(chunk, scan.offset, examine, count - len(found), match)
            examine -= pos - scan.offset
            found += got
            scan.offset = pos
            if pos >= len(chunk):
                chunks.popleft()  # walked: let it go (a removed key's str is freed)
                scan.offset = 0
                scan.refs -= len(chunk)
                self.refs -= len(chunk)
        return found

    def _copy(self, scan: Scan) -> None:
        """Copy the next chunk of ``scan``'s snapshot from its frozen namespace."""
        space = scan.space
        if scan.copy is None:
            return
        if not space.frozen:  # thawed under it (a restore): the copy cannot go on
            self.drop(scan)
            return
        chunk = tuple(islice(scan.copy, SNAPSHOT_CHUNK))
        if chunk:
            scan.chunks.append(chunk)
        if len(chunk) < SNAPSHOT_CHUNK:
            self._end_copy(scan)

    def _end_copy(self, scan: Scan) -> None:
        """The copy is complete (or given up): thaw the namespace, let the next waiting scan start its own."""
        space = scan.space
        scan.copy = None
        if self.copying.get(space) is scan:
            del self.copying[space]
            space.thaw()
            self._start_next(space)
        # What it holds now, not the estimate it was admitted with.
        held = sum(map(len, scan.chunks)) - scan.offset
        self.refs += held - scan.refs
        scan.refs = held

    def _start_next(self, space) -> None:
        queue = self.waiting.get(space)
        if not queue:
            self.waiting.pop(space, None)
            return
        scan = queue.popleft()
        if not queue:
            del self.waiting[space]
        scan.started = True
        scan.copy = space.freeze()
        self.copying[space] = scan

    def _resume(self, cursor: int, ns: str, pattern: str) -> Scan:
        scan = self.open.pop(cursor, None)
        if scan is None:
            raise InvalidArgument(
                f"scan cursor {cursor} is unknown: the scan ended, or was dropped (its connection closed, "
                f"more than {SCANS_PER_SESSION} open on one connection, or idle under the Manager's limits)"
            )
        self.open[cursor] = scan  # now the most recently used
        mine = self.by_session.get(scan.session_id)
        if mine is not None and mine.pop(cursor, None) is not None:
            mine[cursor] = scan
        if scan.ns != ns or scan.pattern != pattern:
            raise InvalidArgument(f"scan cursor {cursor} belongs to a scan of another namespace or pattern")
        scan.used = self.clock()
        return scan

    def _admit(self, session_id: int, space, ns: str, pattern: str, refs: int) -> Scan:
        mine = self.by_session.get(session_id)
        if mine is not None and len(mine) >= SCANS_PER_SESSION:
            self.drop(next(iter(mine.values())))
        if len(self.open) >= MAX_SCANS or self.refs + refs > MAX_SCAN_REFS:
            idle = self.clock() - SCAN_IDLE
            for scan in list(self.open.values()):
                if len(self.open) < MAX_SCANS and self.refs + refs <= MAX_SCAN_REFS:
                    break
                if scan.used <= idle:
                    self.drop(scan)
            if len(self.open) >= MAX_SCANS or self.refs + refs > MAX_SCAN_REFS:
                raise LimitExceeded(
                    f"the Manager's open scans hold {len(self.open)} scans and {self.refs} keys; a scan of "
                    f"{refs} keys more is over its limits ({MAX_SCANS} scans, {MAX_SCAN_REFS} keys): "
                    "finish the iterations under way first"
                )
        cursor = self._next
        self._next += 1
        scan = Scan(cursor, session_id, space, ns, pattern, refs, self.clock())
        self.open[cursor] = scan
        self.by_session.setdefault(session_id, {})[cursor] = scan
        self.refs += refs
        return scan

    def _drop(self, scan: Scan) -> None:
        if self.open.pop(scan.cursor, None) is None:
            return
        space = scan.space
        if self.copying.get(space) is scan:
            self._end_copy(scan)  # thawed now: a dropped scan does not keep its namespace frozen
        elif not scan.started:
            queue = self.waiting.get(space)
            if queue is not None and scan in queue:
                queue.remove(scan)
                if not queue:
                    del self.waiting[space]
        self.refs -= scan.refs
        scan.refs = 0
        scan.chunks.clear()
        scan.copy = None
        mine = self.by_session.get(scan.session_id)
        if mine is not None:
            mine.pop(scan.cursor, None)
            if not mine:
                del self.by_session[scan.session_id]

    def drop_session(self, session_id: int) -> None:
        """A connection closed: its scans go (work: its own scans only)."""
        mine = self.by_session.get(session_id)
        if mine:
            for scan in list(mine.values()):
                self.drop(scan)

    def drop(self, scan: Scan) -> None:
        """Drop a scan before its end (its cursor is refused from now on)."""
        self.dropped += 1
        self._drop(scan)
