"""The one parser of Redis URLs: `scheme://[user[:password]@]host[:port][,host:port...][/path][?query]`.

Everything before the last `@` of the part after `scheme://` is user-info, percent-decoded, so
a password written as is may hold `/ ? # @ :` (only the username may not hold `:`). No error
message built here quotes the user-info, and `redacted()` is the only form of a URL for logs.
It imports nothing from redis-py, so settings and scripts can use it cheaply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import parse_qs, unquote

# Kept in one place so a message that quotes part of a URL quotes at most this much.
MAX_QUOTED_CHARS = 80


@dataclass(frozen=True)
class RedisUrl:
    """A Redis URL in parts; `nodes` keep their order, `port` None where the URL names none."""

    scheme: str
    username: str | None
    password: str | None
    nodes: tuple[tuple[str, int | None], ...]
    path: str
    query: Mapping[str, list[str]]

    @property
    def has_credentials(self) -> bool:
        return self.username is not None or self.password is not None

    def redacted(self) -> str:
        """The URL for logs and health: the username kept, the password never shown."""
        user = self.username or ""
        credentials = f"{user}:***@" if self.password is not None else (f"{user}@" if user else "")
        return f"{self.scheme}://{credentials}{self.location()}{self.path}"

    def location(self) -> str:
        return ",".join(_node_text(host, port) for host, port in self.nodes)

    def with_nodes(self, nodes: tuple[tuple[str, int | None], ...]) -> str:
        """This URL, credentials and all, pointing at other nodes (for test topologies)."""
        credentials = ""
        if self.has_credentials:
            user = _quote_userinfo(self.username or "")
            credentials = f"{user}:{_quote_userinfo(self.password)}@" if self.password is not None else f"{user}@"
        query = "&".join(f"{name}={value}" for name, values in self.query.items() for value in values)
        location = ",".join(_node_text(host, port) for host, port in nodes)
        return f"{self.scheme}://{credentials}{location}{self.path}{'?' + query if query else ''}"


# Every scheme --redis-url takes, for the one message that lists them.
SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel")
SCHEMES_TEXT = (
    "redis:// or rediss:// (TLS) or unix:// for one server, redis+cluster:// (rediss+cluster://) for a Redis "
    "Cluster, redis+sentinel:// (rediss+sentinel://) for Sentinel"
)


def parse_redis_url(url: str) -> RedisUrl:
    """Splits a Redis URL; ValueError with a message that never quotes the user-info."""
    scheme, separator, rest = url.partition("://")
    if not separator or not scheme:
        raise ValueError(f"a Redis URL starts with a scheme: {SCHEMES_TEXT}")
    if scheme.lower() not in SCHEMES:
        # Only a well-formed scheme is quoted: text before a "://" inside a password is not one.
        shown = f" {scheme.lower()!r}" if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme) else ""
        raise ValueError(f"unsupported Redis URL scheme{shown}: use {SCHEMES_TEXT}")
    userinfo, at, after = rest.rpartition("@")
    username = password = None
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if colon else None
    if "#" in after:
        raise ValueError("a Redis URL has no #fragment (a '#' in a password is fine)")
    location_and_path, _, query_text = after.partition("?")
    location, slash, path = location_and_path.partition("/")
    return RedisUrl(
        scheme=scheme.lower(),
        username=username,
        password=password,
        nodes=tuple(_node(item) for item in location.split(",") if item),
        path=slash + path,
        query=parse_qs(query_text, keep_blank_values=True),
    )


def _node(text: str) -> tuple[str, int | None]:
    if text.startswith("["):  # IPv6: [::1]:6379
        host, bracket, port_text = text[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise ValueError(f"bad host in the Redis URL: {_quoted(text)}")
        port_text = port_text[1:]
    else:
        host, _, port_text = text.partition(":")
    if not port_text:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in the Redis URL: {_quoted(port_text)} (a number from 1 to 65535)")
    return host, int(port_text)


def _node_text(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


def _quote_userinfo(text: str) -> str:
    # Only what the parser itself would misread: '%' (decoded), '@' stays fine (last '@' wins),
    # ':' ends the username, so the username has it encoded.
    return text.replace("%", "%25").replace(":", "%3A")


def _quoted(text: str) -> str:
    return repr(text[:MAX_QUOTED_CHARS])
