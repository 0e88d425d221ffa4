"""`manage.py test` of the example, run through pgmux by tests/django (test_shop via the `*` entry)."""

import io
import threading

from django.core.management import call_command
from django.db import connection, connections
from django.test import Client, TestCase, TransactionTestCase

from shop.models import Account, Item
from shop.views import ACCOUNTS, INITIAL_BALANCE, ITEMS


class ViewTests(TestCase):
    def test_items(self):
        data = self.client.get("/items/").json()
        self.assertEqual(data["count"], ITEMS)

    def test_iterator_uses_a_server_side_cursor(self):
        self.assertFalse(connection.settings_dict["DISABLE_SERVER_SIDE_CURSORS"])
        data = self.client.get("/items/iter/").json()
        self.assertEqual(data["count"], ITEMS)
        self.assertEqual(data["qty"], sum(i % 7 for i in range(1, ITEMS + 1)))

    def test_transfer_keeps_the_total(self):
        for _ in range(5):
            self.assertEqual(self.client.get("/transfer/").status_code, 200)
        self.assertEqual(self.client.get("/balance/").json()["total"], ACCOUNTS * INITIAL_BALANCE)

    def test_health(self):
        response = self.client.get("/pgmux/health")
        self.assertEqual(response.status_code, 200, response.content)
        item = response.json()["databases"]["default"]
        self.assertEqual(item["console"], "ok")
        self.assertEqual(item["cl_waiting"], 0)

    def test_database_checks_pass(self):
        call_command("check", "--database", "default", "--fail-level", "WARNING", stdout=io.StringIO())


class ConcurrencyTests(TransactionTestCase):
    """Several connections at once: one client alone would hide session bugs in a pooler."""

    serialized_rollback = True

    def test_concurrent_select_for_update_and_iterators(self):
        errors = []

        def work():
            client = Client()
            try:
                for _ in range(10):
                    self.assertEqual(client.get("/transfer/").status_code, 200)
                    self.assertEqual(sum(1 for _ in Item.objects.iterator(chunk_size=50)), ITEMS)
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)
            finally:
                connections.close_all()

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(errors, [])
        self.assertEqual(sum(a.balance for a in Account.objects.all()), ACCOUNTS * INITIAL_BALANCE)
