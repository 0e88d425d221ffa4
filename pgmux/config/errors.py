"""The one exception type the config package raises.

Every problem found while reading pgbouncer.ini, whatever its cause (syntax, bad value, missing
include, undecodable bytes), is reported as a ConfigError that says where it happened, so that an
operator reading the log can go straight to the offending line.
"""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem, located as precisely as we can: file, line and key."""

    file: str | None
    line: int | None
    key: str | None
    message: str

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        parts: list[str] = []
        if self.file is not None:
            parts.append(self.file if self.line is None else f"{self.file}:{self.line}")
        elif self.line is not None:
            parts.append(f"line {self.line}")
        if self.key is not None:
            parts.append(self.key)
        parts.append(self.message)
        return ": ".join(parts)

    def __reduce__(self) -> tuple[object, ...]:
        # Keep keyword-only arguments when pickled (workers receive config errors across processes).
        return (_rebuild, (self.message, self.file, self.line, self.key))

    def located(self, *, file: str | None, line: int | None, key: str | None = None) -> ConfigError:
        """Return a copy with the location filled in where this error had none."""
        return ConfigError(
            self.message,
            file=self.file if self.file is not None else file,
            line=self.line if self.line is not None else line,
            key=self.key if self.key is not None else key,
        )


def _rebuild(message: str, file: str | None, line: int | None, key: str | None) -> ConfigError:
    return ConfigError(message, file=file, line=line, key=key)
