from django.urls import path

from testproject.demo import views

urlpatterns = [
    path("hit/", views.hit, name="hit"),
    path("whoami/", views.whoami, name="whoami"),
]
