from django.urls import include, path
from shop import views

urlpatterns = [
    path("items/", views.items, name="items"),
    path("items/iter/", views.items_iter, name="items-iter"),
    path("transfer/", views.transfer, name="transfer"),
    path("balance/", views.balance, name="balance"),
    path("nodb/", views.nodb, name="nodb"),
    path("pgmux/", include("pgmux.django.urls")),
]
