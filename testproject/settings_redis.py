"""testproject on Django's RedisCache instead of the Manager: the peer that
bench/bench_http.py measures runcluster against. The Redis address comes
from the REDIS_URL environment variable (the benchmark starts its own server)."""

import os

from testproject.settings import *  # noqa: F403

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"),
    },
    "sessions": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"),
        "KEY_PREFIX": "sessions",
    },
}
