"""Django signals of django-clustershm.

``changed``: sent in a listening process for every event its listeners
receive (see :func:`django_clustershm.listen`), with ``sender`` the
namespace (``""`` for the shared store, a cache's LOCATION) and the keyword
arguments ``key``, ``value``, ``event`` and ``handle``::

    from django.dispatch import receiver
    from django_clustershm.signals import changed

    @receiver(changed, sender="")
    def on_shared_change(sender, key, value, event, **kwargs):
        ...
"""

from django.dispatch import Signal

from .client import dispatcher

changed = Signal()


def _send_changed(ns, key, value, event, handle) -> None:
    changed.send(sender=ns, key=key, value=value, event=event, handle=handle)


dispatcher.observers.append(_send_changed)
