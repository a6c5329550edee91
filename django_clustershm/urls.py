"""The dashboard and the metrics, for a project's URLconf (docs/dashboard.md)::

    path("clustershm/", include("django_clustershm.urls")),

``clustershm:dashboard`` is the page (staff only), ``clustershm:json`` its
figures as JSON, ``clustershm:metrics`` the Prometheus metrics.
"""

from django.urls import path

from .dashboard import views

app_name = "clustershm"

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("json/", views.figures_json, name="json"),
    path("metrics/", views.metrics, name="metrics"),
]
