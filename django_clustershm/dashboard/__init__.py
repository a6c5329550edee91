"""The live dashboard and the Prometheus metrics (``django_clustershm.urls``; docs/dashboard.md).

``figures`` builds one dict from the engine's ``stats()``; ``chart`` draws
the ops history as inline SVG; ``views`` renders the page, its JSON and the
metrics (``metrics``), staff only unless the METRICS setting opens the metrics.
"""
