"""Loading limit files in envoyproxy/ratelimit's YAML format into a `RateLimitConfig`.

Owns finding the files (paths, directories, ConfigMap mounts) and building the descriptor
tree from the specs `config.parser` reads, with the Go server's loadConfig/loadDescriptors
checks: empty domain, duplicate domain or composite key, units, replaces, share_threshold,
plus this project's one additive key, `rate_limit.algorithm`. Error texts are the Go
server's, so operators see the same messages from both.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

from ratelimit.config.errors import ConfigError
from ratelimit.config.matcher import DescriptorNode, RateLimitConfig
from ratelimit.config.model import Algorithm, RateLimitRule, Unit
from ratelimit.config.parser import (
    DescriptorSpec,
    FileSpec,
    RateLimitSpec,
    os_error_text,
    parse_file,
)

PathLike = str | os.PathLike[str]

CONFIG_SUFFIXES = (".yaml", ".yml")

_UNITS_BY_NAME: dict[str, Unit] = {unit.name: unit for unit in Unit if unit is not Unit.UNKNOWN}
_ALGORITHMS_BY_NAME = {algorithm.value: algorithm for algorithm in Algorithm}


def discover_config_files(paths: Iterable[PathLike]) -> list[str]:
    """The files `paths` name: files as given, directories' *.yaml / *.yml sorted by name.

    Directory listings skip hidden entries, which leaves a Kubernetes ConfigMap mount
    (`..data -> ..2024_xx/`, `x.yaml -> ..data/x.yaml`) with each file once, via its
    symlink. Directories are not searched recursively.
    """
    files: list[str] = []
    for path in paths:
        text = os.fspath(path)
        if not os.path.isdir(text):
            files.append(text)  # a missing file is reported when it is read
            continue
        try:
            with os.scandir(text) as listing:
                names = sorted(
                    entry.name
                    for entry in listing
                    if not entry.name.startswith(".")
                    and entry.name.endswith(CONFIG_SUFFIXES)
                    and entry.is_file()  # follows symlinks
                )
        except OSError as error:
            raise ConfigError(text, os_error_text(error)) from error
        files.extend(os.path.join(text, name) for name in names)
    return files


def load_config(paths: Sequence[PathLike], *, merge_domains: bool = False) -> RateLimitConfig:
    """Load and validate every config file under `paths`; raise the first `ConfigError`.

    With `merge_domains` several files may add descriptors to one domain (Go's
    MERGE_DOMAIN_CONFIG); without it a domain seen twice is an error naming the second file.
    """
    files = discover_config_files(paths)
    # Like the Go server: every file is parsed before any is loaded into the tree.
    parsed = [parse_file(file) for file in files]
    builder = _TreeBuilder(merge_domains)
    for spec in parsed:
        builder.add_file(spec)
    return builder.build()


def validate_paths(paths: Sequence[PathLike], *, merge_domains: bool = False) -> list[ConfigError]:
    """Every error in the config files under `paths`, at most one per file, in file order."""
    errors: list[ConfigError] = []
    parsed: list[FileSpec] = []
    try:
        files = discover_config_files(paths)
    except ConfigError as error:
        return [error]
    for file in files:
        try:
            parsed.append(parse_file(file))
        except ConfigError as error:
            errors.append(error)
    builder = _TreeBuilder(merge_domains)
    for spec in parsed:
        try:
            builder.add_file(spec)
        except ConfigError as error:
            errors.append(error)
    order = {file: index for index, file in enumerate(files)}
    errors.sort(key=lambda error: order.get(error.file, len(order)))
    return errors


class _TreeBuilder:
    def __init__(self, merge_domains: bool) -> None:
        self._merge_domains = merge_domains
        self._domains: dict[str, DescriptorNode] = {}
        self._rules: list[RateLimitRule] = []
        self._files: list[str] = []

    def add_file(self, spec: FileSpec) -> None:
        """Load one file's domain; on error nothing of the file is kept."""
        file = spec.file
        if not spec.domain:
            raise ConfigError(file, "config file cannot have empty domain", key="domain")
        existing = self._domains.get(spec.domain)
        if existing is not None and not self._merge_domains:
            raise ConfigError(
                file,
                f"duplicate domain '{spec.domain}' in config file",
                key=spec.domain,
            )
        # Load into a fresh root, checking top-level keys against the domain's existing
        # ones as well, then commit: a failing file leaves the tree as it was.
        staging = DescriptorNode()
        rules: list[RateLimitRule] = []
        taken = existing.children if existing is not None else {}
        self._load_descriptors(file, staging, spec.domain, (), spec.descriptors, taken, rules)
        if existing is None:
            self._domains[spec.domain] = staging
        else:
            existing.adopt(staging)
        self._rules.extend(rules)
        self._files.append(file)

    def build(self) -> RateLimitConfig:
        return RateLimitConfig(self._domains, self._rules, self._files)

    def _load_descriptors(
        self,
        file: str,
        parent: DescriptorNode,
        parent_key: str,
        parent_parts: tuple[str, ...],
        descriptors: list[DescriptorSpec],
        taken: Mapping[str, DescriptorNode],
        rules: list[RateLimitRule],
    ) -> None:
        for descriptor in descriptors:
            if not descriptor.key:
                raise ConfigError(file, "descriptor has empty key", key="key")
            # The Go composite key: "key" or "key_value"; it names the node everywhere.
            segment = f"{descriptor.key}_{descriptor.value}" if descriptor.value else descriptor.key
            full_key = f"{parent_key}.{segment}"
            if segment in parent.children or segment in taken:
                raise ConfigError(
                    file,
                    f"duplicate descriptor composite key '{full_key}'",
                    key=full_key,
                )
            rule = None
            if descriptor.rate_limit is not None:
                rule = _make_rule(file, descriptor, descriptor.rate_limit, full_key)
                rules.append(rule)
            if descriptor.share_threshold and "*" not in segment:
                raise ConfigError(
                    file,
                    "share_threshold can only be used with wildcard values (containing '*'), "
                    f"but found key '{segment}'",
                    key=full_key,
                )
            node = DescriptorNode(
                segment=segment,
                stats_key=full_key,
                stats_key_parts=(*parent_parts, segment),
                rule=rule,
                value_to_metric=descriptor.value_to_metric,
                share_threshold=descriptor.share_threshold,
            )
            self._load_descriptors(
                file,
                node,
                full_key,
                node.stats_key_parts,
                descriptor.descriptors,
                {},
                rules,
            )
            parent.add_child(node)


def _make_rule(file: str, descriptor: DescriptorSpec, spec: RateLimitSpec, full_key: str) -> RateLimitRule:
    unit: Unit | None = _UNITS_BY_NAME.get(spec.unit.upper())
    if spec.unlimited:
        if unit is not None:
            raise ConfigError(file, "should not specify rate limit unit when unlimited", key="unit")
        unit = Unit.UNKNOWN  # Go ignores an unparseable unit on an unlimited rule
    elif unit is None:
        raise ConfigError(file, f"invalid rate limit unit '{spec.unit}'", key="unit")
    for replaced in spec.replaces:
        if not replaced:
            raise ConfigError(file, "should not have an empty replaces entry", key="replaces")
        if replaced == spec.name:
            raise ConfigError(
                file,
                "replaces should not contain name of same descriptor",
                key="replaces",
            )
    algorithm = Algorithm.SLIDING_WINDOW
    if spec.algorithm:
        found = _ALGORITHMS_BY_NAME.get(spec.algorithm.lower())
        if found is None:
            expected = " or ".join(f"'{name}'" for name in _ALGORITHMS_BY_NAME)
            raise ConfigError(
                file,
                f"invalid rate limit algorithm '{spec.algorithm}' for key 'algorithm' (expected {expected})",
                key="algorithm",
            )
        algorithm = found
    return RateLimitRule(
        full_key=full_key,
        requests_per_unit=spec.requests_per_unit,
        unit=unit,
        unlimited=spec.unlimited,
        name=spec.name,
        replaces=tuple(spec.replaces),
        shadow_mode=descriptor.shadow_mode,
        quota_mode=descriptor.quota_mode,
        detailed_metric=descriptor.detailed_metric,
        algorithm=algorithm,
        metadata=descriptor.metadata,
    )
