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
