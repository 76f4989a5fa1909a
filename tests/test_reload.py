"""Hot reload: a valid change applies, an invalid one keeps the old config and is counted."""

from __future__ import annotations

import os
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from ratelimit.client import RateLimitClient
from ratelimit.metrics import Metrics
from ratelimit.reload import ConfigHolder
from tests.support.replica import running_replica

LIMIT_3 = "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 3}\n"
LIMIT_7 = LIMIT_3.replace("3}", "7}")
BROKEN = "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: fortnight, requests_per_unit: 3}\n"


def limit_of(holder: ConfigHolder) -> int:
    match = holder.current().lookup("d", [("k", "v")])
    assert match is not None
    return match.rule.requests_per_unit


def make_holder(path: Path) -> tuple[ConfigHolder, CollectorRegistry]:
    registry = CollectorRegistry()
    holder = ConfigHolder([str(path)], merge_domains=False, metrics=Metrics(registry))
    holder.load()
    return holder, registry


def touch_later(path: Path, text: str) -> None:
    path.write_text(text)
    stamp = time.time() + 5  # a distinct mtime even on coarse file systems
    os.utime(path, (stamp, stamp))


def test_valid_change_applies_and_invalid_change_keeps_the_old_config(tmp_path: Path) -> None:
    file = tmp_path / "limits.yaml"
    file.write_text(LIMIT_3)
    holder, registry = make_holder(file)
    assert holder.reload_if_changed() is False  # nothing changed
    touch_later(file, LIMIT_7)
    assert holder.reload_if_changed() is True and limit_of(holder) == 7
    touch_later(file, BROKEN)
    assert holder.reload_if_changed() is False
    assert limit_of(holder) == 7
    assert holder.last_error is not None and "limits.yaml" in holder.last_error and "fortnight" in holder.last_error
    assert registry.get_sample_value("ratelimit_config_load_error_total") == 1
    assert registry.get_sample_value("ratelimit_config_healthy") == 0
    touch_later(file, LIMIT_3)
    assert holder.reload_if_changed() is True and limit_of(holder) == 3
    assert registry.get_sample_value("ratelimit_config_healthy") == 1


def test_configmap_symlink_swap_is_picked_up(tmp_path: Path) -> None:
    mount = tmp_path / "mount"
    first, second = mount / "..2026_01", mount / "..2026_02"
    first.mkdir(parents=True)
    second.mkdir()
    (first / "limits.yaml").write_text(LIMIT_3)
    (second / "limits.yaml").write_text(LIMIT_7)
    (mount / "..data").symlink_to(first.name)
    (mount / "limits.yaml").symlink_to("..data/limits.yaml")
    holder, _ = make_holder(mount)
    assert limit_of(holder) == 3
    # Kubernetes swaps ..data atomically with a rename over the old link
    (mount / "..data_tmp").symlink_to(second.name)
    os.replace(mount / "..data_tmp", mount / "..data")
    assert holder.reload_if_changed() is True and limit_of(holder) == 7


def test_a_running_replica_applies_a_change_within_two_seconds(tmp_path: Path) -> None:
    file = tmp_path / "limits.yaml"
    file.write_text(LIMIT_3)
    with (
        running_replica(tmp_path, [file], extra_args=["--config-poll-s", "0.5"]) as replica,
        RateLimitClient(replica.target) as client,
    ):
        assert client.should_rate_limit("d", [[("k", "v")]]).statuses[0].requests_per_unit == 3
        touch_later(file, LIMIT_7)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if client.should_rate_limit("d", [[("k", "v")]]).statuses[0].requests_per_unit == 7:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the new limit was not applied within 2 s")
        touch_later(file, BROKEN)
        time.sleep(1.5)
        assert client.should_rate_limit("d", [[("k", "v")]]).statuses[0].requests_per_unit == 7
    assert "config reload failed, keeping the previous config" in replica.log()
    assert "fortnight" in replica.log()


def test_a_reload_names_every_bad_file_in_one_line_and_keeps_the_good_config(tmp_path: Path) -> None:
    limits = tmp_path / "limits"
    limits.mkdir()
    first, second = limits / "a.yaml", limits / "b.yaml"
    first.write_text(LIMIT_3)
    second.write_text("domain: e\n")
    with (
        running_replica(tmp_path, [limits], extra_args=["--config-poll-s", "0.2"]) as replica,
        RateLimitClient(replica.target) as client,
    ):
        touch_later(first, BROKEN)
        touch_later(second, "domain: e\nbogus: 1\n")
        deadline = time.monotonic() + 5
        while "config reload failed" not in replica.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.should_rate_limit("d", [[("k", "v")]]).statuses[0].requests_per_unit == 3
    refusals = [line for line in replica.log().splitlines() if "config reload failed" in line]
    assert len(refusals) == 1, refusals
    assert "keeping the previous config (2 errors): " in refusals[0]
    assert f"{first}: line 4: invalid rate limit unit 'fortnight' for key 'unit'" in refusals[0]
    assert f"{second}: line 2: config error, unknown key 'bogus'" in refusals[0]
