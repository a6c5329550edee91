"""Core latency: one client of a Manager, one operation at a time, against the cheapest Python IPC round trip.

Sequential calls of ``clustershm.connect()``'s client to a Manager in a forked process (the whole path: pickling,
framing, the Unix socket, the dispatch, the reply), each median over the *floor*, a length-prefixed pickle echo on
a socketpair: what the Manager costs above it is its own. Target: a get hit at most 2x the floor (README.md).
"""

from __future__ import annotations

import os
import pickle
import socket
import struct

import lab
from lab import clustershm

#: The "small value" of every operation that stores or returns one.
VALUE = {"id": 42, "name": "alice", "active": True, "score": 3.5, "tags": ["a", "b"]}
MANY = 10
LENGTH = struct.Struct("!I")
BLOCK = 1000  # timed calls per operation per round of the interleaving
FLOOR = "floor round trip"


def _recv_frame(recv, buf: bytes) -> tuple[bytes | None, bytes]:
    """One length-prefixed frame from ``recv`` (None at EOF), and what follows it."""
    size = LENGTH.size
    while len(buf) < size or len(buf) < size + LENGTH.unpack_from(buf)[0]:
        chunk = recv(65536)
        if not chunk:
            return None, buf
        buf += chunk
    end = size + LENGTH.unpack_from(buf)[0]
    return buf[size:end], buf[end:]


def _floor_child(sock: socket.socket) -> None:
    """Body of the floor process: a length-prefixed pickle echo on a socketpair, until EOF."""
    recv, sendall, loads, dumps, pack = sock.recv, sock.sendall, pickle.loads, pickle.dumps, LENGTH.pack
    buf = b""
    while True:
        frame, buf = _recv_frame(recv, buf)
        if frame is None:
            return
        loads(frame)
        body = dumps(VALUE)
        sendall(pack(len(body)) + body)


def _floor_caller(sock: socket.socket):
    recv, sendall, loads, dumps, pack = sock.recv, sock.sendall, pickle.loads, pickle.dumps, LENGTH.pack
    request = ("get", "", "bench:hit")

    def floor():
        body = dumps(request)
        sendall(pack(len(body)) + body)
        frame, _ = _recv_frame(recv, b"")
        if frame is None:
            raise ConnectionError("the floor process went away")
        return loads(frame)

    return floor


def _operations(client, floor) -> dict:
    """name -> zero-argument callable; also seeds the keys the reads need."""
    many_keys = [f"bench:many:{i}" for i in range(MANY)]
    many_items = {f"bench:setmany:{i}": VALUE for i in range(MANY)}
    client.set("bench:hit", VALUE)
    client.remove("bench:missing")
    client.set_many(dict.fromkeys(many_keys, VALUE))
    if client.get("bench:hit") != VALUE or floor() != VALUE or client.get("bench:missing") is not None:
        raise lab.BenchError("a get of the seeded keys does not return what was stored")
    get, set_, incr, get_many, set_many = client.get, client.set, client.incr, client.get_many, client.set_many
    return {FLOOR: floor, "get hit": lambda: get("bench:hit"), "get miss": lambda: get("bench:missing"),
            "set": lambda: set_("bench:set", VALUE), "incr": lambda: incr("bench:counter"),
            f"get_many({MANY} keys)": lambda: get_many(many_keys),
            f"set_many({MANY} keys)": lambda: set_many(many_items)}  # fmt: skip


def main(argv=None) -> int:
    args = lab.options(__doc__, argv, {"n": 2000, "warmup": 200}, n=(lab.count, 20000, "timed calls per operation"),
                       warmup=(lab.count0, 1000, "untimed calls per operation first"),
                       pin=(int, None, "run every process on this one CPU (default: unpinned)"))  # fmt: skip
    if args.pin is not None:
        try:
            os.sched_setaffinity(0, {args.pin})  # inherited by the children forked below
        except (OSError, ValueError) as exc:
            raise lab.BenchError(f"cannot pin to CPU {args.pin}: {exc}") from exc

    with lab.Lab("core") as bench:
        bench.start_manager(configure=False)
        floor_sock, floor_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            floor_pid = lab.fork(_floor_child, floor_end, close=[floor_sock.fileno()])
        finally:
            floor_end.close()

        def stop_floor() -> list[str]:
            floor_sock.close()  # EOF: the floor process returns
            rc = lab.reap(floor_pid, timeout=5.0)
            return [] if rc == 0 else [f"the floor process ended with {lab.describe(rc)}"]

        bench.cleanups.append(stop_floor)
        client = clustershm.connect(bench.address, bench.secret)
        bench.cleanups.append(client.close)
        ops = _operations(client, _floor_caller(floor_sock))
        # Only the server under measurement runs: the other is stopped, so both see the same machine.
        pause = {name: bench.manager_pid if name == FLOOR else floor_pid for name in ops}
        results = lab.time_interleaved(ops, args.n, args.warmup, BLOCK, pause)

    floor = results[FLOOR]["median_us"]
    for row in results.values():
        row["ratio_to_floor"] = row["median_us"] / floor
    hit = results["get hit"]["ratio_to_floor"]
    line, target = lab.target(f"get-hit median / floor median = {hit:.2f}x (target <= 2x)", hit, 2.0)
    rows = [[name, lab.fmt(r["median_us"]), lab.fmt(r["p99_us"]), f"{r['ratio_to_floor']:.2f}x"]
            for name, r in results.items()]  # fmt: skip
    placement = f"pinned to CPU {args.pin}" if args.pin is not None else "unpinned"
    text = [
        lab.header(f"django-clustershm core latency: N={args.n} timed calls per operation after {args.warmup} "
                   f"warm-up, {placement}, {bench.elapsed:.1f}s"),
        lab.table(["operation", "median (µs)", "p99 (µs)", "median / floor"], rows),
        line,
    ]  # fmt: skip
    headlines = {"core get hit median (µs)": (results["get hit"]["median_us"], "lower")}
    return lab.finish(args, bench, text, {"value": repr(VALUE), "results": results, "target": target}, headlines)


if __name__ == "__main__":
    lab.run(main)
