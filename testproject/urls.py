from django.urls import path

from testproject.demo import views

urlpatterns = [
    path("hit/", views.hit, name="hit"),
    path("whoami/", views.whoami, name="whoami"),
    path("slow/", views.slow, name="slow"),
    path("booted/", views.booted, name="booted"),
]
