from django.contrib.auth import views as auth_views
from django.urls import include, path

from testproject.demo import views

urlpatterns = [
    path("", views.index, name="index"),
    path("hit/", views.hit, name="hit"),
    path("counter/", views.counter, name="counter"),
    path("cincr/", views.cache_incr, name="cache_incr"),
    path("cached/", views.cached, name="cached"),
    path("fragment/", views.fragment, name="fragment"),
    path("near/", views.near, name="near"),
    path("login/", views.login, name="login"),
    path("me/", views.me, name="me"),
    path("logout/", views.logout, name="logout"),
    path("whoami/", views.whoami, name="whoami"),
    path("slow/", views.slow, name="slow"),
    path("booted/", views.booted, name="booted"),
    path("code/", views.code, name="code"),
    path("lock/", views.lock, name="lock"),
    path("bench/", views.bench, name="bench"),
    path("flags/", views.flags_view, name="flags"),
    # async views, for runcluster --asgi (under WSGI Django runs them too, one event loop per request)
    path("ahit/", views.ahit, name="ahit"),
    path("acounter/", views.acounter, name="acounter"),
    path("abench/", views.abench, name="abench"),
    path("alock/", views.alock, name="alock"),
    # The live dashboard and the Prometheus metrics (docs/dashboard.md): staff only,
    # so the demo has a login page (LOGIN_URL's default) for a staff user made with
    # `manage.py migrate && manage.py createsuperuser`.
    path("clustershm/", include("django_clustershm.urls")),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login-page"),
]
