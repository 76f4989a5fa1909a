"""The errors a limits config can raise: each a message tied to the file, line and key at fault."""

from __future__ import annotations

from collections.abc import Sequence


class ConfigError(Exception):
    """A config file that cannot be loaded, with its reason.

    `str(error)` is "<file>: line <n>: <message>" ("<file>: <message>" when no line applies:
    a missing file, an empty folder), the Go server's "<file>: <message>" shape with the
    line in front of the message. `key` is the YAML key or descriptor key at fault, when
    there is one; the message names it too.
    """

    def __init__(self, file: str, message: str, *, key: str | None = None, line: int | None = None) -> None:
        where = f"line {line}: " if line is not None else ""
        super().__init__(f"{file}: {where}{message}")
        self.file = file
        self.message = message
        self.key = key
        self.line = line

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only arguments would be lost by the default Exception pickling.
        return (_rebuild_config_error, (self.file, self.message, self.key, self.line))


def _rebuild_config_error(file: str, message: str, key: str | None, line: int | None) -> ConfigError:
    return ConfigError(file, message, key=key, line=line)


class InvalidConfig(ConfigError):
    """Every error of a config that did not load; it reads as the first, `errors` holds all.

    `str()` is one line per error, so a log line or a health message shows them all.
    """

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        if not errors:
            raise ValueError("InvalidConfig needs at least one error")
        first = errors[0]
        super().__init__(first.file, first.message, key=first.key, line=first.line)
        self.errors = tuple(errors)
        self.args = ("\n".join(str(error) for error in self.errors),)

    def __reduce__(self) -> tuple[object, ...]:
        return (InvalidConfig, (self.errors,))
