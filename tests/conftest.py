import pytest

import django_clustershm as clustershm
from django_clustershm import registry

from . import helpers
from .helpers import ManagerProcess

#: The transports every contract test runs on: "the same semantics" is tested, not claimed.
TRANSPORTS = ["embedded", "socket", "socket+near"]


@pytest.fixture
def manager_process():
    """A Manager serving in its own forked process."""
    proc = ManagerProcess().start()
    yield proc
    proc.cleanup()


@pytest.fixture
def socket_client(manager_process):
    client = helpers.socket_client(manager_process.address, manager_process.secret, timeout=5)
    yield client
    client.shutdown()
    client.close()


@pytest.fixture
def cluster():
    """A Manager in its own process; this process and the processes it forks use it."""
    proc = ManagerProcess().start()
    clustershm.configure(proc.address, proc.secret)
    yield proc
    clustershm.configure(None)
    proc.cleanup()


@pytest.fixture(params=["embedded", "socket"])
def anywhere(request):
    """Semantics that must hold in both modes (threads stand in for processes in embedded mode)."""
    if request.param == "embedded":
        yield None
        return
    proc = ManagerProcess().start()
    clustershm.configure(proc.address, proc.secret)
    yield proc
    clustershm.configure(None)
    proc.cleanup()


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    return request.param


@pytest.fixture
def client(transport):
    """The same API over every transport: every semantic test runs on each."""
    if transport == "embedded":
        client = helpers.embedded_client()
        yield client
        client.shutdown()
        return
    proc = ManagerProcess().start()
    client = helpers.socket_client(proc.address, proc.secret, timeout=5)
    if transport == "socket+near":
        client.enable_near_cache("")
    yield client
    client.shutdown()
    client.close()
    proc.cleanup()


@pytest.fixture(autouse=True)
def _fresh_module_client():
    """Each test starts with the module-level API unconfigured."""
    registry.reset()
    yield
    registry.reset()
