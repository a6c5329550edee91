"""Settings of the demo and test project of django-clustershm."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

# A demo project: the key only signs the demo's sessions on a developer's machine.
SECRET_KEY = "django-insecure-clustershm-demo-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]", "testserver"]

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django_clustershm",
    "testproject.demo",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]

ROOT_URLCONF = "testproject.urls"
WSGI_APPLICATION = "testproject.wsgi.application"
# What `runcluster --asgi` serves (unset: Django's get_asgi_application()).
ASGI_APPLICATION = "testproject.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]

# Only the dashboard's staff login uses the database (sessions live in the cache).
# DEMO_DB: another file, e.g. the browser test's temporary one.
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DEMO_DB") or BASE_DIR / "db.sqlite3",
    }
}

USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_clustershm": {"handlers": ["console"], "level": "INFO"}},
}

# Django's cache framework on the Manager: every worker shares these caches.
CACHES = {
    "default": {
        "BACKEND": "django_clustershm.cache.ClusterShmCache",
        "LOCATION": "default",
        "TIMEOUT": 300,
        "OPTIONS": {"MAX_ENTRIES": 10000, "CULL_FREQUENCY": 3},
    },
    # Read on every request, written rarely: each worker keeps a near cache
    # of sessions, kept consistent by the Manager (README, "Near cache").
    "sessions": {
        "BACKEND": "django_clustershm.cache.ClusterShmCache",
        "LOCATION": "sessions",
        "TIMEOUT": 1209600,
        "OPTIONS": {"MAX_ENTRIES": 100000, "NEAR_CACHE": {"MAX_ENTRIES": 10000, "MAX_BYTES": 16 * 2**20}},
    },
    # Read-mostly values behind a near cache (the /near/ view): flags, settings, prices.
    "near": {
        "BACKEND": "django_clustershm.cache.ClusterShmCache",
        "LOCATION": "near",
        "OPTIONS": {"NEAR_CACHE": {"MAX_ENTRIES": 10000}},
    },
}

# Login state in the cache session engine: any worker sees any session.
SESSION_ENGINE = "django.contrib.sessions.backends.cache"
SESSION_CACHE_ALIAS = "sessions"

# django-clustershm: all optional, shown with their defaults.
CLUSTERSHM = {
    # Once per cluster start, against the Manager, before any worker.
    "ON_START": "testproject.demo.startup.on_start",
    "TIMEOUT": 5.0,
    "MAX_KEY_SIZE": 4096,
    "MAX_VALUE_SIZE": 32 * 1024 * 1024,
}

# Snapshots (README, "Snapshots"): the demo keeps its state across restarts when
# DEMO_SNAPSHOT names a file, e.g. DEMO_SNAPSHOT=/tmp/demo-state/clustershm.snap.
if os.environ.get("DEMO_SNAPSHOT"):
    CLUSTERSHM["SNAPSHOT"] = {"PATH": os.environ["DEMO_SNAPSHOT"], "INTERVAL": 60}

# Beyond one host (README, "The Redis engine"): DEMO_ENGINE=redis://127.0.0.1:6379/0
# puts the state on Redis or Valkey; every runcluster on every host then shares it.
if os.environ.get("DEMO_ENGINE"):
    CLUSTERSHM["ENGINE"] = os.environ["DEMO_ENGINE"]
    CLUSTERSHM["ENGINE_OPTIONS"] = {"KEY_PREFIX": os.environ.get("DEMO_ENGINE_PREFIX", "demo")}
    # Near caches on Redis: "strict" (a write returns once every worker of every host
    # holding the key dropped its copy) unless DEMO_NEAR_CONSISTENCY says "eventual".
    for _alias in CACHES.values():
        _near = _alias.get("OPTIONS", {}).get("NEAR_CACHE")
        if _near is not None:
            _near["CONSISTENCY"] = os.environ.get("DEMO_NEAR_CONSISTENCY", "strict")
