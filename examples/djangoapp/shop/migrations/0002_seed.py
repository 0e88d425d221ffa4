"""Seed data: 500 items and 20 accounts of 1000 each (also in test databases, which run migrations)."""

from django.db import migrations

ITEMS = 500
ACCOUNTS = 20
INITIAL_BALANCE = 1000


def seed(apps, schema_editor):
    Item = apps.get_model("shop", "Item")
    Account = apps.get_model("shop", "Account")
    db = schema_editor.connection.alias
    Item.objects.using(db).bulk_create(
        Item(pk=i, name=f"item {i}", qty=i % 7, price=i % 100) for i in range(1, ITEMS + 1)
    )
    Account.objects.using(db).bulk_create(
        Account(pk=i, owner=f"owner {i}", balance=INITIAL_BALANCE) for i in range(1, ACCOUNTS + 1)
    )
    # explicit primary keys: move the sequences past them
    with schema_editor.connection.cursor() as cur:
        for table in ("shop_item", "shop_account"):
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")


def unseed(apps, schema_editor):
    apps.get_model("shop", "Item").objects.all().delete()
    apps.get_model("shop", "Account").objects.all().delete()


class Migration(migrations.Migration):
    dependencies = [("shop", "0001_initial")]
    operations = [migrations.RunPython(seed, unseed)]
