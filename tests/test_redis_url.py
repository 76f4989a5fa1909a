"""Redis URLs: one parser; passwords written as is may hold `/ ? # @ :` and never reach a message."""

from __future__ import annotations

import asyncio
from typing import Iterator

import pytest
import redis

from ratelimit.limiter import BackendError
from ratelimit.limiter.redis_backend import RedisBackend
from ratelimit.limiter.redis_connect import endpoint_from_url, parse_target
from ratelimit.limiter.redis_url import parse_redis_url
from ratelimit.settings import settings_from_environment
from tests.support.processes import RedisServer, running_redis

HOSTILE_PASSWORDS = ["s3cr/etPW", "pa55?word", "pa#55", "p@ss@word", "us:er:pa55", "a/b?c#d@e:f%zz"]


def test_a_password_written_as_is_may_hold_url_delimiters() -> None:
    for password in HOSTILE_PASSWORDS:
        url = parse_redis_url(f"redis://app:{password}@redis:6380/2")
        assert (url.username, url.password, url.nodes, url.path) == ("app", password, (("redis", 6380),), "/2")
        endpoint = endpoint_from_url(url, {})
        assert (endpoint.host, endpoint.port, endpoint.db, endpoint.password) == ("redis", 6380, 2, password)


def test_percent_encoded_user_info_is_decoded() -> None:
    url = parse_redis_url("redis://us%3Aer:p%40ss%2F@h:1")
    assert (url.username, url.password) == ("us:er", "p@ss/")


def test_cluster_and_sentinel_urls_keep_hostile_passwords_whole() -> None:
    cluster = parse_target(parse_redis_url("redis+cluster://:a/b?c#d@e:f@n1:7000,n2:7001"))
    assert (cluster.password, cluster.nodes) == ("a/b?c#d@e:f", (("n1", 7000), ("n2", 7001)))
    sentinel = parse_target(parse_redis_url("redis+sentinel://u:x/y@z@s1:26379,[::1]:26380/mymaster/3"))
    assert (sentinel.username, sentinel.password) == ("u", "x/y@z")
    assert (sentinel.nodes, sentinel.primary_name, sentinel.db) == ((("s1", 26379), ("::1", 26380)), "mymaster", 3)


def _fragments(secret: str, length: int = 3) -> set[str]:
    return {secret[start : start + length] for start in range(len(secret) - length + 1)}


@pytest.mark.parametrize(
    "template",
    [
        "redis://user:{password}@redis:63x79/0",  # bad port
        "redis://user:{password}@redis:6379/zero",  # bad database
        "redis://user:{password}@redis:6379/0?socket_timeout=1",  # unknown parameter
        "redis://user:{password}@redis:6379/0#frag",  # a fragment
        "redis+sentinel://user:{password}@s1:26379",  # no primary name
        "redis+cluster://user:{password}@n1",  # no port
        "http://user:{password}@redis:6379",  # wrong scheme
    ],
)
def test_errors_never_show_any_part_of_the_password(template: str) -> None:
    password = "Zqx/Xkv?Wjw#Vhu@Ugt:Tfs"
    url = template.format(password=password)
    with pytest.raises(ValueError) as caught:
        RedisBackend(url, timeout_s=0.1)
    message = str(caught.value)
    assert message  # says what is wrong
    assert not {fragment for fragment in _fragments(password) if fragment in message}, message


def test_the_redacted_url_shows_the_user_and_hides_every_part_of_the_password() -> None:
    password = "Zqx/Xkv?Wjw#Vhu@Ugt:Tfs"
    redacted = parse_redis_url(f"redis://app:{password}@redis:6379/0").redacted()
    assert redacted == "redis://app:***@redis:6379/0"
    settings = settings_from_environment({"RATELIMIT_REDIS_URL": f"redis://app:{password}@redis:6379/0"})
    assert settings.redacted_redis_url() == redacted


@pytest.fixture(scope="module")
def guarded_redis() -> Iterator[tuple[RedisServer, str]]:
    password = "a/b?c#d@e:f"
    with running_redis() as server:
        redis.Redis(port=server.port).config_set("requirepass", password)
        yield server, password


@pytest.mark.parametrize("batching", [True, False])
def test_a_redis_with_a_hostile_password_is_reached_with_the_password_written_as_is(
    guarded_redis: tuple[RedisServer, str], batching: bool
) -> None:
    server, password = guarded_redis

    async def ping(url: str) -> BaseException | None:
        backend = RedisBackend(url, timeout_s=1.0, batching=batching)
        try:
            await backend.ping()
            await backend.prepare()
            return None
        except BackendError as exc:
            return exc
        finally:
            await backend.close()

    assert asyncio.run(ping(f"redis://:{password}@127.0.0.1:{server.port}/0")) is None
    refused = asyncio.run(ping(f"redis://:{password}x@127.0.0.1:{server.port}/0"))
    assert isinstance(refused, BackendError) and refused.kind == "connection"
    assert not {fragment for fragment in _fragments(password) if fragment in str(refused)}
