"""The current limits config, and hot reload that never trades a good config for a bad one.

Files are polled (cheap: a stat per file) rather than watched with inotify, which also
catches Kubernetes ConfigMap updates: those swap a `..data` symlink, so the resolved
path of every file changes at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Sequence

from ratelimit.config import ConfigError, InvalidConfig, RateLimitConfig, discover_config_files, load_config
from ratelimit.filemarks import FileMark, file_mark
from ratelimit.metrics import Metrics, RuleLabels

log = logging.getLogger(__name__)

Fingerprint = tuple[FileMark, ...]


def fingerprint(paths: Sequence[str]) -> Fingerprint:
    """What identifies the config's content on disk: a mark per file (a missing one included)."""
    try:
        files = discover_config_files(paths)
    except ConfigError:
        return ()
    marks = []
    for file in files:
        try:
            marks.append(file_mark(file))
        except OSError:
            marks.append((file, "", -1, -1, -1))
    return tuple(marks)


class ConfigHolder:
    """Holds the config in force; a request reads it once (`current()`), so a reload
    mid-request never mixes two configs."""

    def __init__(self, paths: Sequence[str], *, merge_domains: bool, metrics: Metrics) -> None:
        self._paths = tuple(paths)
        self._merge_domains = merge_domains
        self._metrics = metrics
        self._config = RateLimitConfig.empty()
        self._fingerprint: Fingerprint = ()
        self.last_error: str | None = None

    def current(self) -> RateLimitConfig:
        return self._config

    def load(self) -> None:
        """Load now; raise InvalidConfig, with every error, and keep the old config when
        the files are invalid."""
        marks = fingerprint(self._paths)
        try:
            config = load_config(self._paths, merge_domains=self._merge_domains)
        except InvalidConfig as exc:
            self._fingerprint = marks  # don't retry the same bad files every poll
            self.last_error = str(exc)
            self._metrics.config_load_error.inc()
            self._metrics.config_healthy.set(0)
            raise
        self._config = config
        self._fingerprint = marks
        self.last_error = None
        self._metrics.config_load_success.inc()
        self._metrics.config_healthy.set(1)
        self._metrics.declare_rules(
            RuleLabels.from_stats_key_parts(domain, parts) for domain, parts in config.rule_stats_keys()
        )

    def reload_if_changed(self) -> bool:
        """Reload when the files changed; True when a new config is in force."""
        if fingerprint(self._paths) == self._fingerprint:
            return False
        try:
            self.load()
        except InvalidConfig as exc:
            # One log line (log shippers keep lines whole) naming every bad file, line and key.
            log.error(
                "config reload failed, keeping the previous config (%d %s): %s",
                len(exc.errors),
                "error" if len(exc.errors) == 1 else "errors",
                "; ".join(str(error) for error in exc.errors),
            )
            return False
        log.info("config reloaded: %s", self._config.summary())
        return True

    async def watch(self, poll_s: float) -> None:
        while True:
            await asyncio.sleep(poll_s)
            # stat() and YAML parsing are blocking; keep them off the event loop.
            await asyncio.to_thread(self.reload_if_changed)
