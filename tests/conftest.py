import pytest

import django_clustershm as clustershm
from django_clustershm import conf
from django_clustershm.client import EmbeddedClient, SocketClient

from .helpers import ManagerProcess


@pytest.fixture
def manager_process():
    """A Manager serving in its own forked process."""
    proc = ManagerProcess().start()
    yield proc
    proc.cleanup()


@pytest.fixture
def socket_client(manager_process):
    client = SocketClient(manager_process.address, manager_process.secret, timeout=5)
    yield client
    client.close()


@pytest.fixture
def cluster():
    """A Manager in its own process; this process and the processes it forks use it."""
    proc = ManagerProcess().start()
    clustershm.configure(proc.address, proc.secret)
    yield proc
    clustershm.configure(None)
    proc.cleanup()


@pytest.fixture(params=["socket", "embedded"])
def client(request):
    """The same API over both transports: every semantic test runs on each."""
    if request.param == "embedded":
        yield EmbeddedClient()
        return
    proc = ManagerProcess().start()
    client = SocketClient(proc.address, proc.secret, timeout=5)
    yield client
    client.close()
    proc.cleanup()


@pytest.fixture(autouse=True)
def _fresh_module_client():
    """Each test starts with the module-level API unconfigured."""
    conf.reset()
    yield
    conf.reset()
