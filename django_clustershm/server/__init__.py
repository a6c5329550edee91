"""The Manager side: the state and its operations, with no I/O (:mod:`.engine`
over :mod:`.namespace`, :mod:`.locktable`, :mod:`.subscriptions` and
:mod:`.stamps`), and the Unix-socket server around it (:mod:`.manager`).

Nothing here imports the client side, Django or gunicorn: a Manager can run
in any process (``Manager(...).serve_forever()``).
"""

from ..wire.limits import Limits
from .engine import Engine
from .manager import Manager

__all__ = ["Engine", "Limits", "Manager"]
