"""The dashboard's views: the page, its JSON, and the Prometheus metrics.

Who may see what:

* the page and its JSON: active staff users (``is_staff``, as Django's admin
  asks). An anonymous visitor of the page is sent to ``LOGIN_URL``; anyone
  else gets 403. The page's own refresh and the JSON never redirect: a
  script or a poll gets 403, not a login form to parse.
* the metrics: staff too, and, for Prometheus (which has no Django
  session), whoever ``CLUSTERSHM["METRICS"]`` lets in: a bearer token
  (``"TOKEN"``, what Prometheus's ``authorization`` scrape option sends) or
  client addresses (``"ALLOWED_IPS"``, addresses or networks, matched
  against ``REMOTE_ADDR``). Nothing is open by default: behind a reverse
  proxy on the same host every request comes from 127.0.0.1, so "allow
  localhost" would open the metrics to the world. See docs/dashboard.md.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from typing import Any

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.loader import render_to_string
from django.views.decorators.cache import never_cache

from .. import conf
from ..exceptions import ClusterShmError
from ..registry import get_client, mode
from . import chart, figures

#: Seconds between two refreshes of the page (``?refresh=`` overrides, 0 stops them).
REFRESH_SECONDS = 2.0

TEMPLATE = "django_clustershm/dashboard.html"
PANELS = "django_clustershm/panels.html"


def is_staff(request: HttpRequest) -> bool:
    user = getattr(request, "user", None)
    if user is None:
        raise ImproperlyConfigured(
            "the django-clustershm dashboard needs django.contrib.auth's AuthenticationMiddleware (request.user)"
        )
    return bool(user.is_active and user.is_staff)


def _denied(message: str, status: int = 403, headers: dict | None = None) -> HttpResponse:
    response = HttpResponse(message + "\n", status=status, content_type="text/plain; charset=utf-8")
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def _figures() -> tuple[dict[str, Any] | None, str | None]:
    """The figures, or None and why the engine did not answer."""
    try:
        return figures.collect(get_client()), None
    except ClusterShmError as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _refresh(request: HttpRequest) -> float:
    try:
        seconds = float(request.GET.get("refresh", REFRESH_SECONDS))
    except ValueError:
        return REFRESH_SECONDS
    if not 0.5 <= seconds <= 3600:  # 0, nan, or a number setTimeout would take as 0: no refresh
        return 0.0
    return seconds


def _context(request: HttpRequest, found: dict | None, error: str | None) -> dict[str, Any]:
    return {
        "f": found,
        "error": error,
        "chart": chart.ops_chart(found["history"]) if found else None,
        "mode": mode(),
        "refresh": _refresh(request),
        "rendered_at": time.time(),
    }


@never_cache
def dashboard(request: HttpRequest) -> HttpResponse:
    """The page (``?format=json``: the figures as JSON; ``?panels=1``: the page's
    body alone, what its refresh fetches). Mount it with
    ``include("django_clustershm.urls")`` or as an admin page (docs/dashboard.md)."""
    want = "json" if request.GET.get("format") == "json" else "panels" if "panels" in request.GET else "page"
    if not is_staff(request):
        if want == "page" and not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        return _denied("staff only")
    found, error = _figures()
    if want == "json":
        return _json(found, error)
    context = _context(request, found, error)
    if want == "panels":
        return HttpResponse(render_to_string(PANELS, context, request=request))
    return HttpResponse(render_to_string(TEMPLATE, context, request=request))


def _json(found: dict | None, error: str | None) -> JsonResponse:
    if found is None:
        return JsonResponse({"error": error}, status=503)
    return JsonResponse(found, json_dumps_params={"allow_nan": False})


@never_cache
def figures_json(request: HttpRequest) -> HttpResponse:
    """The figures as JSON, for scripts: staff only, never a redirect."""
    if not is_staff(request):
        return _denied("staff only")
    return _json(*_figures())


# -- metrics -----------------------------------------------------------------------------------


def _metrics_settings() -> dict:
    value = conf.settings().get("METRICS") or {}
    if not isinstance(value, dict):
        raise ImproperlyConfigured('CLUSTERSHM["METRICS"] is a dict: {"TOKEN": ..., "ALLOWED_IPS": [...]}')
    return value


def _networks(allowed) -> list:
    try:
        return [ipaddress.ip_network(str(entry), strict=False) for entry in allowed]
    except ValueError as exc:
        raise ImproperlyConfigured(f'CLUSTERSHM["METRICS"]["ALLOWED_IPS"]: {exc}') from exc


def metrics_access(request: HttpRequest) -> HttpResponse | None:
    """None if ``request`` may read the metrics, else the response that says no."""
    settings = _metrics_settings()
    token = settings.get("TOKEN")
    if token:
        given = request.headers.get("Authorization", "")
        scheme, _, credentials = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), str(token).encode()):
            return None
    allowed = settings.get("ALLOWED_IPS")
    if allowed:
        try:
            address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
        except ValueError:
            address = None
        if address is not None and any(address in network for network in _networks(allowed)):
            return None
    if getattr(request, "user", None) is not None and is_staff(request):
        return None
    if token:
        return _denied("a bearer token is needed", 401, {"WWW-Authenticate": 'Bearer realm="clustershm metrics"'})
    return _denied('staff only (or set CLUSTERSHM["METRICS"]: docs/dashboard.md)')


@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    """The figures in Prometheus's text format (OpenMetrics if the scraper asks for it)."""
    refused = metrics_access(request)
    if refused is not None:
        return refused
    try:
        from . import metrics as exporter
    except ImportError as exc:
        raise ImproperlyConfigured(
            "the metrics view needs prometheus_client: pip install 'django-clustershm[prometheus]'"
        ) from exc
    found, _error = _figures()
    body, content_type = exporter.exposition(found, request.headers.get("Accept"))
    return HttpResponse(body, content_type=content_type)
