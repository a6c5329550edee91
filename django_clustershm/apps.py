from django.apps import AppConfig


class ClusterShmConfig(AppConfig):
    name = "django_clustershm"
    verbose_name = "Cluster shared memory"
