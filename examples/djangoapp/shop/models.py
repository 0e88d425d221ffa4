from django.db import models


class Item(models.Model):
    name = models.CharField(max_length=100)
    qty = models.IntegerField(default=0)
    price = models.DecimalField(max_digits=10, decimal_places=2, default=0)

    def __str__(self) -> str:
        return self.name


class Account(models.Model):
    """Money moves between accounts under select_for_update; the total never changes."""

    owner = models.CharField(max_length=100, unique=True)
    balance = models.IntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.owner}: {self.balance}"
