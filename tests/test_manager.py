"""The Manager with real processes: sharing, atomicity, fork safety, rogue clients, auth."""

import os
import pickle
import signal
import socket
import stat
import struct
import threading
import time

import msgpack
import pytest

import django_clustershm as clustershm
from django_clustershm import Manager
from django_clustershm.exceptions import AuthenticationFailed, ManagerUnavailable
from django_clustershm.wire import frames as P
from django_clustershm.wire import handshake as H

from .helpers import ManagerProcess, block_until_killed, fork_call, reap, run_forked, socket_client, wait_until


def _handshaked_socket(address: str, secret: bytes) -> socket.socket:
    """A raw connection that completes the handshake, for sending crafted frames."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(address)
    reader = P.FrameReader()
    ((op, _, payload),) = reader.feed(sock.recv(512))
    auth, _client_nonce = H.answer_hello(op, payload, secret)
    sock.sendall(auth)
    ((op, _, _),) = reader.feed(sock.recv(512))
    assert op == P.OK
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# -- sharing and atomicity across processes ----------------------------------------


def test_four_processes_incr_one_key_exactly(manager_process):
    def worker(i):
        client = socket_client(manager_process.address, manager_process.secret)
        for _ in range(5000):
            client.incr("counter")
        client.close()

    assert run_forked(4, worker) == [0, 0, 0, 0]
    client = socket_client(manager_process.address, manager_process.secret)
    assert client.get("counter") == 20000
    client.close()


def test_a_write_in_one_process_is_read_in_another(manager_process):
    addr, secret = manager_process.address, manager_process.secret

    def writer():
        socket_client(addr, secret).set("shared", {"user": "Tom"})

    assert reap(fork_call(writer), 10) == 0

    def reader():
        assert socket_client(addr, secret).get("shared") == {"user": "Tom"}

    assert reap(fork_call(reader), 10) == 0


def test_add_is_won_by_exactly_one_process(manager_process):
    addr, secret = manager_process.address, manager_process.secret

    def racer(i):
        client = socket_client(addr, secret)
        for k in range(300):
            if client.add(f"slot{k}", i):
                client.incr(f"won{i}")

    assert run_forked(4, racer) == [0] * 4
    client = socket_client(addr, secret)
    assert sum(client.get(f"won{i}", 0) for i in range(4)) == 300
    client.close()


def test_clients_are_listed_with_their_pids_and_dropped_when_they_die(manager_process):
    addr, secret = manager_process.address, manager_process.secret
    r, w = os.pipe()

    def idle():
        client = socket_client(addr, secret)
        client.ping()
        os.write(w, b"1")
        block_until_killed()

    pid = fork_call(idle)
    os.read(r, 1)
    os.close(r)
    os.close(w)
    client = socket_client(addr, secret)
    assert pid in [c["pid"] for c in client.stats()["clients"]]
    os.kill(pid, signal.SIGKILL)
    reap(pid, 10)
    wait_until(lambda: pid not in [c["pid"] for c in client.stats()["clients"]], message="dead client dropped")
    client.close()


# -- fork safety ---------------------------------------------------------------------


def test_fork_while_the_manager_is_under_load():
    """A Manager thread busy serving others while this process forks children.

    This is the runcluster situation: the master's Manager thread is
    mid-operation when the arbiter forks a worker. The children must neither
    deadlock nor reuse a descriptor of the parent's, and the Manager must keep
    serving.
    """
    manager = Manager().start()
    client = socket_client(manager.address, manager.secret)
    stop = threading.Event()
    counts = [0, 0]

    def load(i):
        c = socket_client(manager.address, manager.secret)
        while not stop.is_set():
            c.incr("load")
            c.set(f"v{i}", b"x" * 1000)
            counts[i] += 1
        c.close()

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: min(counts) > 50, message="load running")
        client.set("before-fork", "hello")  # this thread's connection exists at fork time
        inherited = client.transport._local.conn

        def child(i):
            # The parent's connection was closed in the child by the at-fork hook.
            assert inherited.sock.fileno() == -1
            # The Manager's listening socket was closed too.
            assert manager._listener.fileno() == -1
            c = socket_client(manager.address, manager.secret)
            assert c.get("before-fork") == "hello"
            for _ in range(200):
                c.incr("from-children")
            # The module-level client in the child is a new connection too.
            assert client.get("before-fork") == "hello"
            assert client.transport._local.conn is not inherited

        codes = run_forked(8, child, timeout=30)
        assert codes == [0] * 8
        assert client.get("from-children") == 1600
        # The parent's own connection still works and was never shared.
        assert client.transport._local.conn is inherited
        assert client.get("before-fork") == "hello"
        before = sum(counts)
        wait_until(lambda: sum(counts) > before + 50, message="load continues after forks")
    finally:
        stop.set()
        for t in threads:
            t.join()
        client.close()
        manager.close()
    assert not os.path.exists(manager.address)


def test_close_removes_files_and_is_idempotent():
    manager = Manager().start()
    directory = os.path.dirname(manager.address)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(manager.address).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(manager.secret_file).st_mode) == 0o600
    manager.close()
    manager.close()
    assert not os.path.exists(directory)


# -- rogue clients: only that connection closes, everyone else is served ---------------


GARBAGE = [
    ("bad magic", b"XX" + bytes([P.VERSION, P.GET]) + struct.pack("!II", 1, 2) + b"\x90\x90"),
    ("unsupported protocol version", b"CS" + bytes([9, P.GET]) + struct.pack("!II", 1, 1) + b"\x90"),
    ("exceeds the maximum", b"CS" + bytes([P.VERSION, P.SET]) + struct.pack("!II", 1, 2**31)),
    ("malformed payload", P.HEADER.pack(b"CS", P.VERSION, P.GET, 1, 1) + b"\xc1"),
]

#: Well-formed frames whose arguments the Manager refuses: an error reply, and
#: the connection (with its locks) stays. (code, words of the message, frame)
REFUSED = [
    (16, "unknown opcode", P.encode(0x5F, 7, [])),
    (17, "malformed arguments", P.encode(P.GET, 7, ["", "k", "extra", "args"])),
    (17, "a list of arguments", P.encode(P.GET, 7, 42)),
    (17, "values are bin or int", P.encode(P.SET, 7, ["", "k", "a str value", None])),
    (17, "timeout must be a number", P.encode(P.SET, 7, ["", "k", b"v", "soon"])),
    (16, "timeout must be a finite number", P.encode(P.SET, 7, ["", "k", b"v", float("nan")])),
    (16, "timeout must be a finite number", P.encode(P.TOUCH, 7, ["", "k", float("inf")])),
    (17, "set_many takes a flat list", P.encode(P.SET_MANY, 7, ["", ["k"], None])),
    (17, "delta must be an int", P.encode(P.INCR, 7, ["", "k", 1.5, 0])),
    (17, "token must be", P.encode(P.LOCK_RELEASE, 7, ["held", None])),
    (16, "lease must be a positive", P.encode(P.LOCK_ACQUIRE, 7, ["other", -1, 0])),
    (17, "bounds must be", P.encode(P.SET, 7, ["c", "k", b"v", None, "big"])),
    (16, "takes no cache bounds", P.encode(P.SET, 7, ["", "k", b"v", None, [1, 1, 1]])),
]


@pytest.mark.parametrize("reason, frame", GARBAGE, ids=[g[0] + str(i) for i, g in enumerate(GARBAGE)])
def test_rogue_frame_closes_only_that_connection(manager_process, reason, frame):
    good = socket_client(manager_process.address, manager_process.secret)
    good.set("precious", [1, 2, 3])
    rogue = _handshaked_socket(manager_process.address, manager_process.secret)
    rogue.sendall(frame)
    assert _closed_by_peer(rogue)
    rogue.close()
    assert good.get("precious") == [1, 2, 3]
    wait_until(lambda: reason in manager_process.log(), message=f"log line {reason!r}")
    good.close()


@pytest.mark.parametrize("code, words, frame", REFUSED, ids=[r[1] + str(i) for i, r in enumerate(REFUSED)])
def test_a_refused_request_gets_an_error_and_the_connection_keeps_its_lock(manager_process, code, words, frame):
    addr, secret = manager_process.address, manager_process.secret
    sock = _handshaked_socket(addr, secret)
    reader = P.FrameReader(P.DEFAULT_MAX_FRAME)

    def reply():
        frames = []
        while not frames:
            frames = reader.feed(sock.recv(65536))
        return frames[0]

    sock.sendall(P.encode(P.LOCK_ACQUIRE, 1, ["held", None, 0]))
    op, rid, payload = reply()
    assert (op, rid) == (P.OK, 1)
    token = P.decode_payload(payload)[0]
    sock.sendall(frame)
    op, rid, payload = reply()
    error = P.decode_payload(payload)
    assert (op, rid, error[0]) == (P.ERR, 7, code) and words in error[1], error
    # Still connected, still the holder: another process cannot take the lock.
    other = socket_client(addr, secret)
    assert other.lock_acquire("held", None, 0) is None
    sock.sendall(P.encode(P.LOCK_RELEASE, 2, ["held", token]))
    op, rid, payload = reply()
    assert (op, rid, P.decode_payload(payload)) == (P.OK, 2, False)
    assert other.lock_acquire("held", None, 0) is not None
    other.close()
    sock.close()


def test_truncated_frame_then_eof(manager_process):
    rogue = _handshaked_socket(manager_process.address, manager_process.secret)
    rogue.sendall(P.encode(P.SET, 1, ["", "k", b"v" * 100, None])[:50])
    rogue.close()
    wait_until(lambda: "ended inside a frame" in manager_process.log(), message="truncation logged")
    client = socket_client(manager_process.address, manager_process.secret)
    assert not client.has("k")
    client.close()


def test_rogue_process_spraying_garbage_while_others_work(manager_process):
    addr, secret = manager_process.address, manager_process.secret

    def rogue():
        rng = __import__("random").Random(7)
        for i in range(300):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(2)
            try:
                s.connect(addr)
                if i % 2:
                    s.sendall(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))))
                else:
                    s.sendall(b"CS" + bytes([P.VERSION]) + bytes(rng.getrandbits(8) for _ in range(40)))
                s.recv(1024)
            except OSError:
                pass
            finally:
                s.close()

    def worker(i):
        c = socket_client(addr, secret)
        for _ in range(2000):
            c.incr("work")

    rogue_pid = fork_call(rogue)
    # (Failed twice in full runs, unreproduced in 50 runs alone: a worker got
    # EPIPE sending its AUTH. The Manager logs why it closes a connection.)
    statuses = run_forked(3, worker)
    assert statuses == [0, 0, 0], f"the Manager's log ends:\n{manager_process.log()[-6000:]}"
    assert reap(rogue_pid, 60) == 0
    client = socket_client(addr, secret)
    assert client.get("work") == 6000
    assert len(client.stats()["clients"]) == 1
    client.close()


def test_a_slow_handshake_is_cut_off():
    manager = Manager()
    manager.handshake_timeout = 0.1
    manager.start()
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(manager.address)
        start = time.monotonic()
        assert _closed_by_peer(s)
        assert time.monotonic() - start < 3
        s.close()
    finally:
        manager.close()


def test_an_unauthenticated_peer_cannot_make_the_manager_buffer(manager_process):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(manager_process.address)
    s.sendall(P.HEADER.pack(b"CS", P.VERSION, P.AUTH, 0, 10_000))
    assert _closed_by_peer(s)
    s.close()
    wait_until(lambda: "exceeds the maximum of 512" in manager_process.log(), message="handshake cap")


# -- authentication ------------------------------------------------------------------


def test_wrong_secret_is_refused(manager_process):
    client = socket_client(manager_process.address, b"not the secret")
    with pytest.raises(AuthenticationFailed, match="refused"):
        client.get("a")
    wait_until(lambda: "wrong secret" in manager_process.log(), message="refusal logged")


def test_the_client_checks_the_manager_knows_the_secret(tmp_path):
    # An impostor on the socket that answers the handshake without the secret.
    path = str(tmp_path / "impostor.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def impostor():
        conn, _ = server.accept()
        conn.sendall(P.encode(P.HELLO, 0, [P.VERSION, os.urandom(32), os.getpid()]))
        conn.recv(512)
        conn.sendall(P.encode(P.OK, 0, [b"\0" * 32, {"max_key": 1, "max_value": 1, "max_frame": 1}, 1]))
        conn.recv(512)
        conn.close()

    t = threading.Thread(target=impostor)
    t.start()
    client = socket_client(path, b"secret")
    with pytest.raises(AuthenticationFailed, match="does not hold the cluster secret"):
        client.get("a")
    t.join()
    server.close()


def test_another_uid_is_refused(manager_process):
    if os.getuid() != 0:
        pytest.skip("needs root to run a child as another uid")  # CI runs as root
    # Open the directory and socket so that only the uid check stands in the way.
    os.chmod(manager_process.dir, 0o755)
    os.chmod(manager_process.address, 0o777)

    def other_user():
        os.setgid(65534)
        os.setuid(65534)
        client = socket_client(manager_process.address, manager_process.secret)
        try:
            client.get("a")
        except AuthenticationFailed:
            return
        raise AssertionError("a client of another uid was accepted")

    assert reap(fork_call(other_user), 10) == 0
    wait_until(lambda: "is not the Manager's uid" in manager_process.log(), message="uid refusal logged")


def test_handshake_version_mismatch_is_refused(manager_process):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(manager_process.address)
    s.recv(512)
    payload = msgpack.packb([b"x" * 32, b"y" * 32, 1])
    s.sendall(b"CS" + bytes([P.VERSION + 1, P.AUTH]) + struct.pack("!II", 0, len(payload)) + payload)
    assert _closed_by_peer(s)
    s.close()


def test_manager_gone_mid_call(manager_process):
    client = socket_client(manager_process.address, manager_process.secret, timeout=5)
    client.set("a", 1)
    manager_process.kill()
    with pytest.raises(ManagerUnavailable):
        client.get("a")
    client.close()


def test_a_closed_connection_never_touches_a_new_one_on_its_fd():
    """Regression: a connection closed earlier in a loop round could, through a
    stale event, remove a new connection that had been given the same fd, whose
    replies were then never sent (seen as a 5 s timeout under load)."""
    import select

    from django_clustershm.server.manager import _Conn

    manager = Manager()
    try:
        a, a_peer = socket.socketpair()
        a.setblocking(False)
        old = _Conn(a, deadline=0)
        manager._conns[old.fd] = old
        manager._ep.register(old.fd, select.EPOLLIN)
        manager._close(old, None)
        b, b_peer = socket.socketpair()
        b.setblocking(False)
        new = _Conn(b, deadline=0)
        manager._conns[new.fd] = new
        manager._ep.register(new.fd, select.EPOLLIN)
        assert new.fd == old.fd  # the kernel hands out the lowest free fd
        manager._close(old, "stale")  # e.g. a stale event for the old connection
        manager._on_readable(old)
        manager._deliver(old, 1, "x")
        assert manager._conns[new.fd] is new and not new.closed
        # The loop maps events by fd: a stale event that reaches the new
        # connection finds nothing to read, and leaves it alone.
        new.session = object()
        manager._on_readable(new)
        assert manager._conns[new.fd] is new and not new.closed
        new.session = None
        for s in (a_peer, b, b_peer):
            s.close()
        manager._conns.clear()
    finally:
        manager.close()


def test_a_second_manager_on_a_live_address_fails_and_leaves_the_first_alone(tmp_path):
    address = str(tmp_path / "m.sock")
    first = Manager(address, b"s" * 32).start()
    try:
        with pytest.raises(OSError, match="already listening"):
            Manager(address, b"t" * 32)
        client = socket_client(address, b"s" * 32)
        client.set("still", "reachable")  # the first one's socket was not unlinked
        assert client.get("still") == "reachable"
        client.close()
    finally:
        first.close()


def test_a_stale_socket_file_is_taken_over(tmp_path):
    address = str(tmp_path / "m.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(address)  # a Manager that died without unlinking its socket
    dead.close()
    manager = Manager(address, b"s" * 32).start()
    try:
        client = socket_client(address, b"s" * 32)
        assert client.ping()
        client.close()
    finally:
        manager.close()


def test_requests_before_a_malformed_frame_are_applied_and_answered(manager_process):
    """The Manager stops at the first bad frame: what came before it is applied
    and answered, nothing after it is read."""
    sock = _handshaked_socket(manager_process.address, manager_process.secret)
    sock.sendall(
        P.encode(P.SET, 1, ["", "before", b"v", None])
        + P.encode(P.INCR, 2, ["", "n", 5, 0])
        + b"XX" + bytes([P.VERSION, P.GET]) + struct.pack("!II", 3, 0)  # bad magic
        + P.encode(P.SET, 4, ["", "after", b"v", None])
    )  # fmt: skip
    reader = P.FrameReader(1 << 20)
    replies = []
    while True:
        data = sock.recv(65536)
        if not data:
            break
        replies += [(op, rid, P.decode_payload(payload)) for op, rid, payload in reader.feed(data)]
    assert replies == [(P.OK, 1, None), (P.OK, 2, 5)]
    sock.close()
    client = socket_client(manager_process.address, manager_process.secret)
    assert client.get("n") == 5 and client.has("before") and not client.has("after")
    client.close()
    wait_until(lambda: "bad magic" in manager_process.log(), message="the reason logged")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_out_of_descriptors_the_manager_backs_off_instead_of_spinning():
    proc = ManagerProcess(nofile=64).start()
    peers = []
    try:
        for _ in range(100):  # more than it can accept: it runs out of descriptors
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(proc.address)
            peers.append(s)
        wait_until(lambda: "cannot accept clients" in proc.log(), message="out of descriptors")
        before = _cpu_seconds(proc.pid)
        time.sleep(1.0)  # a window to measure CPU in, not a wait for a condition
        assert _cpu_seconds(proc.pid) - before < 0.3  # not a busy loop
        assert proc.log().count("cannot accept clients") <= 3  # one line per pause
        for s in peers:
            s.close()
        peers.clear()
        client = socket_client(proc.address, proc.secret, timeout=5)
        wait_until(lambda: _pings(client), timeout=10, message="served again once descriptors are free")
        client.close()
    finally:
        for s in peers:
            s.close()
        proc.cleanup()


def _pings(client) -> bool:
    try:
        return client.ping()
    except (clustershm.ManagerUnavailable, clustershm.LimitExceeded):  # not served yet
        return False


def test_the_connection_cap_is_its_own_error():
    proc = ManagerProcess(max_connections=2).start()
    try:
        first, second = (socket_client(proc.address, proc.secret) for _ in range(2))
        assert first.ping() and second.ping()
        third = socket_client(proc.address, proc.secret)
        with pytest.raises(clustershm.LimitExceeded, match="connections"):
            third.ping()
        first.close()
        wait_until(lambda: _pings(third), message="a freed slot is usable")
        for client in (second, third):
            client.close()
    finally:
        proc.cleanup()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_pipelined_reads_of_a_large_value_cannot_grow_the_manager_past_its_output_bound():
    """#12 row 1: 5,400 bytes of pipelined GETs of a 1 MiB value made the Manager
    buffer 894 MiB of replies. It now stops reading and answering a connection
    whose unsent output passes its bound (8 MiB here) until the client reads;
    every reply still arrives, in order."""
    proc = ManagerProcess(max_pending_output=8 * 2**20).start()
    try:
        client = socket_client(proc.address, proc.secret)
        value = os.urandom(2**20)
        client.set("big", value)
        sock = _handshaked_socket(proc.address, proc.secret)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        rss_before = _rss_kib(proc.pid)
        count = 300  # 300 MiB of replies if all were answered at once
        sock.sendall(b"".join(P.encode(P.GET, i + 1, ["", "big"]) for i in range(count)))
        assert client.ping()  # everyone else is served meanwhile
        # The backlog builds up to its bound, as the Manager counts it (RSS need not show it: a
        # Manager forked from a big test process reuses the free room in the pages it inherited)...
        wait_until(
            lambda: client.stats()["loop"]["output_bytes"] > 4 * 2**20, message="the backlog builds up to its bound"
        )
        time.sleep(0.2)  # ...and no further, whatever is pipelined behind it
        assert _rss_kib(proc.pid) - rss_before < 48 * 1024  # bound (8 MiB) + a reply in flight + slack, not 300 MiB
        held = client.stats()["loop"]["output_bytes"]  # what the Manager counts: that backlog
        assert 4 * 2**20 < held <= 9 * 2**20 + 1024  # the bound (8 MiB) and the reply that crossed it
        reader = P.FrameReader(P.DEFAULT_MAX_FRAME)
        rids = []
        while len(rids) < count:
            for op, rid, payload in reader.feed(sock.recv(1 << 20)):
                assert op == P.OK and pickle.loads(P.decode_payload(payload)) == value
                rids.append(rid)
        assert rids == list(range(1, count + 1))
        assert client.stats()["loop"]["output_bytes"] == 0
        sock.close()
        client.close()
    finally:
        proc.cleanup()


def _hwm_kib(pid: int) -> int:
    """The process's peak resident size: a backlog built and dropped within
    one round shows here, where a later sample of VmRSS would miss it."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _loop_figures(client) -> dict:
    return client.stats()["loop"]


#: The Manager-wide output budget of the tests below: small, so that what the
#: Manager holds can be told from the per-connection bounds multiplied.
BUDGET = 16 * 2**20


def test_pipelining_clients_that_never_read_hold_the_output_budget_between_them():
    """Each connection's reply bound (128 MiB) multiplied by the clients that
    pipeline reads of a large value without reading the replies: 8 of them
    here would hold 8 x 40 MiB. Past the budget (16 MiB), the Manager answers
    no client that has unsent replies, so together they hold the budget and at
    most a reply each; a client that reads its replies is served throughout,
    exactly; and each pipelining client gets every reply, in order, once it reads."""
    proc = ManagerProcess(max_total_output=BUDGET).start()
    socks = []
    try:
        client = socket_client(proc.address, proc.secret)
        value = os.urandom(2**20)
        client.set("big", value)
        rss_before = _rss_kib(proc.pid)
        count = 40
        for _ in range(8):
            sock = _handshaked_socket(proc.address, proc.secret)
            sock.sendall(b"".join(P.encode(P.GET, i + 1, ["", "big"]) for i in range(count)))
            socks.append(sock)
        for i in range(20):  # served throughout, exactly (a reply of 1 MiB and small ones)
            assert client.get("big") == value
            assert client.incr("n") == i + 1
        held = _loop_figures(client)
        reply = len(P.encode(P.OK, 1, pickle.dumps(value)))  # about; the bound is loose by far more
        assert BUDGET <= held["output_bytes"] <= BUDGET + 8 * (reply + 1024)
        assert held["max_total_output"] == BUDGET
        growth = _hwm_kib(proc.pid) - rss_before
        assert growth < (BUDGET + 8 * reply) // 1024 + 32 * 1024, f"the Manager grew by {growth} KiB"
        for sock in socks:
            reader = P.FrameReader(P.DEFAULT_MAX_FRAME)
            rids = []
            while len(rids) < count:
                for op, rid, payload in reader.feed(sock.recv(1 << 20)):
                    assert op == P.OK and pickle.loads(P.decode_payload(payload)) == value
                    rids.append(rid)
            assert rids == list(range(1, count + 1))
        assert _loop_figures(client)["output_bytes"] == 0
        client.close()
    finally:
        for sock in socks:
            sock.close()
        proc.cleanup()


def test_past_twice_the_output_budget_the_clients_that_do_not_read_are_closed():
    """Held back, a client that never reads still gets one reply once its
    output is empty: N of them could hold N of the largest replies. Past twice
    the budget (a hard ceiling, as Redis's client-output-buffer-limit) the
    clients with the most unsent output are closed until the total is back
    under the budget; a client that reads is served throughout, exactly."""
    budget = 4 * 2**20
    proc = ManagerProcess(max_total_output=budget).start()
    socks = []
    try:
        client = socket_client(proc.address, proc.secret)
        value = os.urandom(2**20)
        client.set("big", value)
        for _ in range(16):  # 16 x (a 1 MiB reply each), over the 8 MiB ceiling
            sock = _handshaked_socket(proc.address, proc.secret)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"".join(P.encode(P.GET, i + 1, ["", "big"]) for i in range(8)))
            socks.append(sock)
            assert client.get("big") == value
        wait_until(lambda: "does not read" in proc.log(), message="the largest backlogs are shed")
        for i in range(10):
            assert client.get("big") == value and client.incr("n") == i + 1
        assert _loop_figures(client)["output_bytes"] <= 2 * budget + 2 * 2**20
    finally:
        for sock in socks:
            sock.close()
        proc.cleanup()


def _listening_socket(address: str, secret: bytes, prefix: str) -> socket.socket:
    """A raw listener channel on the store's keys under ``prefix``, read only when a test says so."""
    sock = _handshaked_socket(address, secret)
    sock.sendall(P.encode(P.LISTEN, 1, [1, "", prefix, True]))
    ((op, rid, _),) = P.FrameReader().feed(sock.recv(512))
    assert (op, rid) == (P.OK, 1)
    return sock


def test_listeners_that_never_read_hold_the_output_budget_between_them_not_each():
    """#12 row 10: listener bounds were per connection, so 30 listeners that
    never read cost 30 times 16 MiB at once (+631 MB measured). The Manager's
    unsent output now has one budget for all clients together (16 MiB here):
    past it, a listener holding more than its share is cut off. The writer is
    never held up, a listener that reads gets every event, exactly, and the
    Manager grows by about the budget, not 30 times a listener's bound."""
    proc = ManagerProcess(max_total_output=BUDGET).start()
    slow = []
    try:
        writer = socket_client(proc.address, proc.secret)
        slow = [_listening_socket(proc.address, proc.secret, "big:") for _ in range(30)]
        good = _listening_socket(proc.address, proc.secret, "big:")
        slow.append(good)
        value = os.urandom(64 * 1024)
        count = 400  # 25 MiB of events for each listener: past its own bound (16 MiB)
        events, errors = [], []

        def read_events():
            reader = P.FrameReader(P.DEFAULT_MAX_FRAME)
            try:
                while len(events) < count:
                    data = good.recv(1 << 20)
                    if not data:
                        errors.append("the listener that reads was cut off")
                        return
                    for op, _, payload in reader.feed(data):
                        events.append((op, P.decode_payload(payload)))
            except Exception as exc:
                errors.append(repr(exc))

        thread = threading.Thread(target=read_events)
        thread.start()
        rss_before = _rss_kib(proc.pid)
        try:
            for i in range(count):
                writer.set(f"big:{i % 4}", value)  # returns: the writer is never held up
                assert writer.get(f"big:{i % 4}") == value
        finally:
            thread.join(30)
        growth = _hwm_kib(proc.pid) - rss_before
        assert errors == [] and len(events) == count
        for i, (op, (_sub, ns, key, event, pickled)) in enumerate(events):
            assert op == P.PUSH_EVENT and (ns, key, event) == ("", f"big:{i % 4}", P.EVENT_SET)
            assert pickle.loads(pickled) == value
        for sock in slow[:30]:
            sock.settimeout(5)
            assert _closed_by_peer(sock), "a listener that never reads was not cut off"
        # The budget (16 MiB), the event that crossed it, and allocator slack; each
        # listener's own bound let them hold 30 x 16 MiB.
        assert growth < 48 * 1024, f"the Manager grew by {growth} KiB"
        figures = wait_until(
            lambda: (f := _loop_figures(writer))["output_bytes"] == 0 and f, message="every backlog gone"
        )
        assert figures["max_total_output"] == BUDGET
        assert "over its share" in proc.log()
        writer.close()
    finally:
        for sock in slow:
            sock.close()
        proc.cleanup()


def test_stats_report_the_loops_longest_stall():
    """The loop's own figure (what #12's stall targets are measured by): a
    round that takes 80 ms shows as at least that."""
    manager = Manager().start()
    try:
        client = socket_client(manager.address, manager.secret)
        assert client.stats()["loop"]["max_stall_ms"] < 80
        done = threading.Event()
        manager.call_soon(lambda: (time.sleep(0.08), done.set()))  # a stand-in for a slow event
        assert done.wait(5)
        figures = client.stats()["loop"]
        assert figures["max_stall_ms"] >= 80 and figures["recent_max_stall_ms"] >= 80
        assert figures["connections"] == 1
        client.close()
    finally:
        manager.close()


def test_replies_before_a_malformed_frame_drain_without_blocking_the_manager(manager_process):
    """Replies larger than the socket can take at once go out on the loop (never
    a blocking send to a peer that may be hostile); then the connection closes."""
    client = socket_client(manager_process.address, manager_process.secret)
    value = os.urandom(2**20)
    client.set("big", value)
    sock = _handshaked_socket(manager_process.address, manager_process.secret)
    sock.sendall(b"".join(P.encode(P.GET, i, ["", "big"]) for i in (1, 2, 3)) + b"XX" + bytes(10))
    assert client.ping()  # served while that connection's 3 MiB wait to be read
    reader = P.FrameReader(P.DEFAULT_MAX_FRAME)
    rids = []
    while True:
        data = sock.recv(1 << 20)
        if not data:
            break
        for op, rid, payload in reader.feed(data):
            assert op == P.OK and pickle.loads(P.decode_payload(payload)) == value
            rids.append(rid)
    assert rids == [1, 2, 3]
    sock.close()
    client.close()


def test_warnings_about_bad_peers_are_rate_limited(manager_process):
    """#12 row 11: 60k bad frames wrote 5.35 MB of log. Each bad peer here is
    closed with a reason, but at most 20 reasons a second are written; the
    rest are counted."""
    for _ in range(200):
        s = _handshaked_socket(manager_process.address, manager_process.secret)
        s.sendall(b"XX" + bytes(10))
        _closed_by_peer(s)
        s.close()
    client = socket_client(manager_process.address, manager_process.secret)
    assert client.ping()
    wait_until(lambda: "were not logged" in manager_process.log(), timeout=10, message="the count held back")
    lines = manager_process.log().count("bad magic")
    assert 20 <= lines < 200
    client.close()


def test_silent_half_open_peers_cannot_keep_a_client_out():
    """#12 row 11: 4,096 unauthenticated peers blocked new clients for 10 s at a
    time. Half-open peers have their own small cap, and the oldest makes room,
    so a client that authenticates gets in at once while they sit there."""
    proc = ManagerProcess(max_unauthenticated=16, max_connections=32).start()
    silent = []
    try:
        for _ in range(100):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(proc.address)
            silent.append(s)  # reads HELLO, never answers
        client = socket_client(proc.address, proc.secret, timeout=2)  # the handshake deadline is 10 s
        assert client.ping()
        assert client.stats()["loop"]["connections"] <= 16 + 1
        client.close()
        wait_until(lambda: "make room for a new peer" in proc.log(), message="the oldest made room")
    finally:
        for s in silent:
            s.close()
        proc.cleanup()


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_client_dropped_between_hello_and_auth_connects_again(monkeypatch, flavour):
    """A half-open peer dropped to make room for a new one (the cap's oldest)
    may learn it only when it sends its AUTH: EPIPE, not an EOF. That is a
    lost handshake too, tried again like one, not an error (the failure of
    test_rogue_process_spraying_garbage_while_others_work's worker: EPIPE
    sending its AUTH)."""
    import asyncio
    import select
    import sys

    from django_clustershm.client.aio import AsyncSocketTransport
    from django_clustershm.client.socket import SocketTransport

    proc = ManagerProcess(max_unauthenticated=1).start()
    intruders: list[socket.socket] = []
    answered = []
    real_answer = H.answer_hello

    def answer_hello(op, payload, secret):
        answered.append(op)
        if len(answered) == 1:
            mine = sys._getframe(1).f_locals["sock"]  # the connection being made
            intruder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            intruders.append(intruder)
            intruder.connect(proc.address)
            intruder.recv(512)  # its HELLO: accepted, so the Manager dropped the oldest half-open peer, us
            poller = select.poll()
            poller.register(mine.fileno(), select.POLLIN | select.POLLHUP)
            wait_until(lambda: poller.poll(0), message="the Manager closed the first connection")
        return real_answer(op, payload, secret)

    monkeypatch.setattr(H, "answer_hello", answer_hello)
    try:
        if flavour == "sync":
            conn = SocketTransport(proc.address, proc.secret, timeout=5).connect()
            conn.close()
        else:

            async def main():
                conn = await AsyncSocketTransport(proc.address, proc.secret, timeout=5)._open()
                conn.sock.close()

            asyncio.run(main())
        assert answered == [P.HELLO, P.HELLO]  # dropped once, then in
        assert "make room for a new peer" in proc.log()
    finally:
        for s in intruders:
            s.close()
        proc.cleanup()


def _fill(keyspace, count: int, timeout=None, batch: int = 2000) -> int:
    """Write up to ``count`` small keys (as an app would: a pickled short str); return how many fit."""
    from django_clustershm.exceptions import StoreFull

    written = 0
    for start in range(0, count, batch):
        try:
            keyspace.set_many({f"user:{i:08d}": f"value-{i}" for i in range(start, start + batch)}, timeout)
        except StoreFull:
            return written
        written += batch
    return written


@pytest.mark.parametrize("kind", ["store", "store+timeout", "cache"])
def test_the_budgets_bound_the_managers_memory(kind):
    """#12 row 8: MAX_STORE_BYTES undercounted (9.3x the budget in RSS). Entries
    now count what they cost, so a Manager filled past its budget (the store
    refuses, a cache evicts) stays within 1.5x the budget plus a fixed base."""
    from django_clustershm.exceptions import StoreFull
    from django_clustershm.server.engine import Engine

    budget = 32 * 2**20
    proc = ManagerProcess(engine=Engine(max_store_bytes=budget)).start()
    try:
        client = socket_client(proc.address, proc.secret)
        rss_before = _rss_kib(proc.pid)
        if kind == "cache":
            cache = client.cache("c", max_entries=10**9, max_bytes=budget)
            assert _fill(cache, 600_000, timeout=300) == 600_000  # twice what fits: the cache evicts
            stats = client.stats()["caches"]["c"]
            assert stats["evictions"] > 0 and stats["bytes"] <= budget
        else:
            timeout = 300 if kind == "store+timeout" else None
            written = _fill(client, 600_000, timeout=timeout)
            assert 50_000 < written < 600_000  # the store refused past its budget...
            with pytest.raises(StoreFull, match="MAX_STORE_BYTES"):
                client.set("one:more", "x" * 2**20)
            assert client.get(f"user:{written - 1:08d}") == f"value-{written - 1}"  # ...and lost nothing
            assert client.stats()["store"]["bytes"] <= budget
        grown = (_rss_kib(proc.pid) - rss_before) * 1024
        assert grown <= 1.5 * budget + 8 * 2**20, f"{grown / 2**20:.1f} MiB for a budget of {budget / 2**20:.0f} MiB"
        client.close()
    finally:
        proc.stop()
        proc.cleanup()


def test_a_client_whose_handshake_is_dropped_connects_again(tmp_path):
    """Half-open peers have a small cap, the oldest making room for a new one, so a
    client caught mid-handshake by a flood can be dropped before anything was
    sent. It connects again by itself (twice at most). Here a relay in front of
    the Manager drops the first two connections, as an eviction would."""
    proc = ManagerProcess().start()
    relay_path = str(tmp_path / "relay.sock")
    relay = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    relay.bind(relay_path)
    relay.listen(8)
    relay.settimeout(10)

    def pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            b.close()

    def serve():
        for i in range(3):
            conn, _ = relay.accept()
            if i < 2:
                conn.close()  # dropped before the handshake
                continue
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(proc.address)
            threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()
            pipe(conn, upstream)

    server = threading.Thread(target=serve)
    server.start()
    try:
        client = socket_client(relay_path, proc.secret)
        assert client.incr("n") == 1  # through the third connection
        client.close()
    finally:
        server.join(10)
        relay.close()
        proc.cleanup()
