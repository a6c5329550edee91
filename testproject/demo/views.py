"""Demo views: state shared by every worker process of the server."""

import os

from django.http import JsonResponse

import django_clustershm as clustershm


def hit(request):
    """A hit counter that stays exact whichever worker serves the request."""
    return JsonResponse({"hits": clustershm.incr("demo:hits"), "pid": os.getpid()})


def whoami(request):
    """Which worker served this request, next to the Manager's figures."""
    stats = clustershm.stats()
    return JsonResponse(
        {
            "pid": os.getpid(),
            "manager_pid": stats["manager_pid"],
            "keys": stats["store"]["keys"],
            "clients": [c["pid"] for c in stats["clients"]],
        }
    )


def slow(request):
    """Sleeps ``?s=`` seconds: lets the tests show a hung worker being replaced."""
    import time

    seconds = float(request.GET.get("s", "1"))
    time.sleep(seconds)
    return JsonResponse({"slept": seconds, "pid": os.getpid()})


def booted(request):
    """What the master stored in AppConfig.ready() before it forked the workers."""
    return JsonResponse({"booted_by": clustershm.get("demo:booted_by"), "pid": os.getpid()})
