"""Views of the example: the benchmark view, an iterator() view and an atomic()+select_for_update view."""

import random

from django.db import transaction
from django.db.models import F, Sum
from django.http import JsonResponse

from shop.models import Account, Item

ITEMS = 500
ACCOUNTS = 20
INITIAL_BALANCE = 1000


def items(request):
    """Two queries, as the spec's benchmark view: a count and a primary-key lookup."""
    count = Item.objects.count()
    item = Item.objects.get(pk=random.randint(1, ITEMS))
    return JsonResponse({"count": count, "item": item.name, "qty": item.qty})


def items_iter(request):
    """QuerySet.iterator(): a server-side WITH HOLD cursor fetched in chunks (pgmux pins it)."""
    n = total = 0
    for item in Item.objects.order_by("pk").iterator(chunk_size=100):
        n += 1
        total += item.qty
    return JsonResponse({"count": n, "qty": total})


def transfer(request):
    """atomic() + select_for_update(): move money between two locked accounts."""
    a, b = sorted(random.sample(range(1, ACCOUNTS + 1), 2))
    amount = random.randint(1, 10)
    with transaction.atomic():
        rows = {acc.pk: acc for acc in Account.objects.select_for_update().filter(pk__in=(a, b)).order_by("pk")}
        src, dst = (rows[a], rows[b]) if random.random() < 0.5 else (rows[b], rows[a])
        Account.objects.filter(pk=src.pk).update(balance=F("balance") - amount)
        Account.objects.filter(pk=dst.pk).update(balance=F("balance") + amount)
    return JsonResponse({"from": src.pk, "to": dst.pk, "amount": amount})


def balance(request):
    total = Account.objects.aggregate(total=Sum("balance"))["total"]
    return JsonResponse({"total": total, "expected": ACCOUNTS * INITIAL_BALANCE})


def nodb(request):
    return JsonResponse({"ok": True})
