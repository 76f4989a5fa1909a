"""The one error type a limits config can raise: a message tied to the file that caused it."""

from __future__ import annotations


class ConfigError(Exception):
    """A config file that envoyproxy/ratelimit would refuse, with its reason.

    `str(error)` is "<file>: <message>", the shape the Go server logs, so operators see the
    same text from both. `key` is the YAML key or descriptor key at fault, when there is one.
    """

    def __init__(self, file: str, message: str, *, key: str | None = None) -> None:
        super().__init__(f"{file}: {message}")
        self.file = file
        self.message = message
        self.key = key

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only `key` would be lost by the default Exception pickling.
        return (_rebuild_config_error, (self.file, self.message, self.key))


def _rebuild_config_error(file: str, message: str, key: str | None) -> ConfigError:
    return ConfigError(file, message, key=key)
