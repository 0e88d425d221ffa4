from django.urls import path

from pgmux.django import views

app_name = "pgmux"
urlpatterns = [
    path("health", views.health, name="health"),
    path("metrics", views.metrics, name="metrics"),
]
