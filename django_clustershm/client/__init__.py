"""The client side: the API (:mod:`.client`), given a transport (:mod:`.transport`).

* :mod:`.transport`: the seam, ``Transport.call`` / ``open_channel`` / ``after_fork``
* :mod:`.socket`: a Manager over its Unix socket (one connection per thread)
* :mod:`.embedded`: the Manager's engine in this process
* :mod:`.serializer`: what a value becomes on the wire
* :mod:`.dispatcher`: listener channels and callbacks
* :mod:`.near`: near caches, consistent process-local copies

Nothing here imports Django or gunicorn.
"""

from .client import Client, Keyspace
from .dispatcher import Handle
from .embedded import EmbeddedTransport
from .serializer import Serializer
from .socket import SocketTransport
from .transport import USE_DEFAULT, Channel, Transport

__all__ = [
    "USE_DEFAULT",
    "Channel",
    "Client",
    "EmbeddedTransport",
    "Handle",
    "Keyspace",
    "Serializer",
    "SocketTransport",
    "Transport",
]
