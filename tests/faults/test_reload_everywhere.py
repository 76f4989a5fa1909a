"""Hot reload on every replica under load: three replicas over one Redis read one config
directory, laid out as a Kubernetes ConfigMap mount. A valid change applies on all three
within 2 s with no failed call; an invalid one keeps the old config everywhere and says
so (log with file and key, metric, health); a `..data` symlink swap applies too."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from pathlib import Path

from ratelimit.client import build_request
from tests.faults import probes
from tests.faults.load import Load, Sample
from tests.faults.report import FaultTable, fault_row
from tests.support.processes import running_redis
from tests.support.replica import ReplicaProcess, running_replica

REPLICAS = 3
APPLY_WITHIN_S = 2.0  # --config-poll-s 1 (the default) plus a reload


def limits(requests_per_unit: int) -> str:
    return (
        "domain: reload\ndescriptors:\n  - key: user\n"
        f"    rate_limit: {{unit: minute, requests_per_unit: {requests_per_unit}}}\n"
    )


BROKEN = "domain: reload\ndescriptors:\n  - key: user\n    ratelimit: {unit: minute, requests_per_unit: 3}\n"


class ConfigMapMount:
    """mount/limits.yaml -> ..data/limits.yaml, ..data -> ..<version>: how the kubelet lays
    out a ConfigMap volume, and how it updates one (a new directory, then a rename of a
    temporary symlink over ..data)."""

    def __init__(self, mount: Path, text: str) -> None:
        self.mount = mount
        self._versions = itertools.count(1)
        mount.mkdir(parents=True)
        (mount / "..data").symlink_to(self._new_version(text))
        (mount / "limits.yaml").symlink_to("..data/limits.yaml")

    def _new_version(self, text: str) -> str:
        name = f"..2026_01_01_00_00_{next(self._versions):02d}"
        (self.mount / name).mkdir()
        (self.mount / name / "limits.yaml").write_text(text)
        return name

    def edit_in_place(self, text: str) -> None:
        """An edit through the symlink, as an operator on a plain directory would do."""
        (self.mount / "limits.yaml").write_text(text)

    def swap(self, text: str) -> None:
        staging = self.mount / "..data_tmp"
        staging.symlink_to(self._new_version(text))
        os.replace(staging, self.mount / "..data")


def apply_times(
    samples: list[Sample], since: float, limit: int, until: float = float("inf")
) -> dict[int, float | None]:
    """Per replica, seconds from `since` to the first answer with `limit`, when from then
    until `until` every answer of that replica has it (no flapping back)."""
    times: dict[int, float | None] = {}
    for target in range(REPLICAS):
        answers = [s for s in samples if s.target == target and since <= s.sent_s < until and s.answered]
        first = next((n for n, s in enumerate(answers) if s.requests_per_unit == limit), None)
        if first is None or any(s.requests_per_unit != limit for s in answers[first:]):
            times[target] = None
        else:
            times[target] = answers[first].done_s - since
    return times


def test_config_changes_apply_on_every_replica_and_a_bad_one_is_refused_everywhere(
    tmp_path: Path, fault_table: FaultTable
) -> None:
    mount = ConfigMapMount(tmp_path / "config", limits(5))
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(running_redis())
        replicas: list[ReplicaProcess] = [
            stack.enter_context(
                running_replica(
                    tmp_path, [mount.mount], redis_url=server.url, extra_args=["--redis-timeout-ms", "1000"]
                )
            )
            for _ in range(REPLICAS)
        ]
        targets = [replica.target for replica in replicas]
        # A user of its own per call: no call is rejected, each answer shows the limit in force.
        load = stack.enter_context(
            Load(
                targets,
                lambda index: build_request("reload", [[("user", f"u{index}")]]),
                rate_per_s=150,
                max_requests=150 * 12,
                max_duration_s=12.0,
                channels_per_target=1,
                deadline_s=2.5,
            )
        )
        time.sleep(0.5)
        edited_at = time.monotonic()
        mount.edit_in_place(limits(7))
        probes.wait_until(lambda: all(apply_times(load.samples, edited_at, 7).values()), APPLY_WITHIN_S + 1)
        time.sleep(0.3)

        broken_at = time.monotonic()
        mount.edit_in_place(BROKEN)
        refused = probes.wait_until(
            lambda: all(
                probes.metric_value(probes.scrape(replica.metrics_port), "ratelimit_config_healthy") == 0
                for replica in replicas
            ),
            APPLY_WITHIN_S + 1,
        )
        time.sleep(1.2)  # another poll: the bad files are not retried into a change
        health_while_broken = [probes.health(target, probes.CONFIG_HEALTH) for target in targets]
        metrics_while_broken = [probes.scrape(replica.metrics_port) for replica in replicas]
        swapped_at = time.monotonic()
        mount.swap(limits(9))
        probes.wait_until(lambda: all(apply_times(load.samples, swapped_at, 9).values()), APPLY_WITHIN_S + 1)
        time.sleep(1.0)  # the state reporter runs every 0.25 s
        health_after_swap = [probes.health(target, probes.CONFIG_HEALTH) for target in targets]
        load.stop()
        samples = load.join()
        logs = [replica.log() for replica in replicas]

    applied_edit = apply_times(samples, edited_at, 7, until=broken_at)
    during_broken = [s for s in samples if broken_at <= s.sent_s < swapped_at]
    applied_swap = apply_times(samples, swapped_at, 9)

    def slowest(times: dict[int, float | None]) -> float | None:
        return None if None in times.values() else max(t for t in times.values() if t is not None)

    fault_table.add(
        fault_row(
            "config reload on 3 replicas: edit 5->7, broken file, ConfigMap swap ->9",
            "valid changes apply everywhere < 2 s, no failed call; a broken file keeps the old config everywhere",
            samples,
            during_fault=[s for s in samples if s.sent_s >= edited_at],
            recovery_s=slowest(applied_swap),
            edit_applied_all_s=slowest(applied_edit),
            broken_refused_all_s=refused,
            swap_applied_all_s=slowest(applied_swap),
            limits_seen_while_broken=sorted({s.requests_per_unit for s in during_broken if s.answered}),
        )
    )

    assert [s for s in samples if not (s.answered and s.decided and s.overall == "OK")] == []
    for phase, times in (("edit", applied_edit), ("swap", applied_swap)):
        assert all(t is not None and t < APPLY_WITHIN_S for t in times.values()), (phase, times)
    # The broken file changed nothing anywhere: 7 stays in force, and every replica says why.
    assert len(during_broken) >= 100 and {s.requests_per_unit for s in during_broken} == {7}
    assert refused is not None
    assert health_while_broken == [probes.NOT_SERVING] * REPLICAS
    for body in metrics_while_broken:
        assert probes.metric_value(body, "ratelimit_config_load_error_total") == 1  # once, not every poll
        assert probes.metric_value(body, "ratelimit_config_healthy") == 0
    for log in logs:
        refusal = [line for line in log.splitlines() if "config reload failed, keeping the previous config" in line]
        assert len(refusal) == 1 and "limits.yaml" in refusal[0] and "'ratelimit'" in refusal[0], refusal
        assert "Traceback" not in log
    assert health_after_swap == [probes.SERVING] * REPLICAS
