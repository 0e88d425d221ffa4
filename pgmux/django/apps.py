from django.apps import AppConfig


class PgmuxConfig(AppConfig):
    name = "pgmux.django"
    label = "pgmux"
    verbose_name = "pgmux connection pooler"

    def ready(self) -> None:
        from pgmux.django import checks  # noqa: F401  (registers the system checks)
