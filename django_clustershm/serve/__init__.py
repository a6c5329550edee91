"""Serving: the Manager inside a gunicorn master (:mod:`.cluster`, the server
hooks) and the gunicorn application behind ``runcluster`` (:mod:`.app`).
Users of their own gunicorn command line import :mod:`django_clustershm.gunicorn_conf`.
"""
