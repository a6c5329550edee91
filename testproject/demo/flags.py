"""Feature flags every worker keeps in sync, with no round trip on the read path.

The recipe: the flags live in the shared store under ``flags:``; each process
keeps a local copy, filled once and then updated by a listener. Reading a
flag is a dict lookup; changing one (from a view, a management command, a
shell attached to the cluster) reaches every worker within microseconds.
"""

import django_clustershm as clustershm

PREFIX = "flags:"
FLAGS: dict = {}


def _on_change(key, value, event):
    name = None if key is None else key[len(PREFIX) :]
    if event == "set":
        FLAGS[name] = value
    elif event == "clear":
        FLAGS.clear()
    else:  # remove, expire
        FLAGS.pop(name, None)


def _load() -> None:
    current = {k[len(PREFIX) :]: v for k, v in clustershm.get_many(clustershm.keys(PREFIX)).items()}
    for name in [n for n in FLAGS if n not in current]:
        FLAGS.pop(name, None)
    FLAGS.update(current)  # readers never see an empty dict in between


def start() -> None:
    """Called from AppConfig.ready(): subscribe first, then load, so no change is missed;
    load again whenever the subscription is made anew (in each forked worker, after a
    reconnection), since changes in between may have been missed. Every engine has
    listeners (the Redis engine since #16): no read-through fallback is needed."""
    clustershm.listen(prefix=PREFIX, callback=_on_change, on_resync=_load)
    _load()


def is_enabled(name: str) -> bool:
    return bool(FLAGS.get(name))


def current() -> dict:
    """Every flag: the local copy."""
    return dict(FLAGS)


def set_flag(name: str, value) -> None:
    clustershm.set(PREFIX + name, value)
