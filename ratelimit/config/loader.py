"""Loading limit files in envoyproxy/ratelimit's YAML format into a `RateLimitConfig`.

Owns finding the files (paths, directories, ConfigMap mounts) and building the descriptor
tree from the specs `config.parser` reads, with the Go server's loadConfig/loadDescriptors
checks: empty domain, duplicate domain or composite key, units, replaces, share_threshold,
plus this project's one additive key, `rate_limit.algorithm`. Error texts start with the
Go server's words, so operators recognise them, and add the line, the key and, for a
value from a fixed set, the valid values. Where Go stops at the first error, this goes on
and reports every error of every file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

from ratelimit.config.errors import ConfigError, InvalidConfig
from ratelimit.config.matcher import DescriptorNode, RateLimitConfig
from ratelimit.config.model import UNIT_NAMES, Algorithm, RateLimitRule, Unit
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


def check_config(
    paths: Sequence[PathLike], *, merge_domains: bool = False
) -> tuple[RateLimitConfig, list[ConfigError]]:
    """The one validator (`serve`, hot reload and `validate-config` all use it): the config
    under `paths` and every error of every file, in file order, then line order. The config
    is only meaningful when there are no errors.

    A folder without config files and an empty `paths` are errors: serving no domain answers
    OK to everything, which is always a mistake (a wrong path, a ConfigMap mid-update).
    """
    errors: list[ConfigError] = []
    files: list[str] = []
    # Where each error goes in the report: the order of the paths and of their files.
    order: dict[str, int] = {}
    if not paths:
        errors.append(ConfigError("(no config)", "no limits config given: name YAML files or folders of them"))
    for path in paths:
        order.setdefault(os.fspath(path), len(order))
        try:
            found = discover_config_files([path])
        except ConfigError as error:
            errors.append(error)
            continue
        if not found:
            suffixes = ", ".join(f"*{suffix}" for suffix in CONFIG_SUFFIXES)
            errors.append(
                ConfigError(os.fspath(path), f"no config files ({suffixes}) in this folder, so it holds no domain")
            )
        for file in found:
            order.setdefault(file, len(order))
        files.extend(found)
    # Like the Go server: every file is parsed before any is loaded into the tree.
    parsed: list[tuple[FileSpec, bool]] = []
    for file in files:
        spec, file_errors = parse_file(file)
        errors.extend(file_errors)
        if spec is not None:
            parsed.append((spec, not file_errors))
    builder = _TreeBuilder(merge_domains)
    for spec, parsed_cleanly in parsed:
        errors.extend(builder.add_file(spec, keep=parsed_cleanly))
    errors.sort(key=lambda error: (order.get(error.file, len(order)), error.line or 0))
    return builder.build(), errors


def load_config(paths: Sequence[PathLike], *, merge_domains: bool = False) -> RateLimitConfig:
    """Load and validate every config file under `paths`; raise `InvalidConfig` with every error.

    With `merge_domains` several files may add descriptors to one domain (Go's
    MERGE_DOMAIN_CONFIG); without it a domain seen twice is an error naming the second file.
    """
    config, errors = check_config(paths, merge_domains=merge_domains)
    if errors:
        raise InvalidConfig(errors)
    return config


def validate_paths(paths: Sequence[PathLike], *, merge_domains: bool = False) -> list[ConfigError]:
    """Every error in the config under `paths` (see `check_config`); empty when it is valid."""
    return check_config(paths, merge_domains=merge_domains)[1]


class _TreeBuilder:
    def __init__(self, merge_domains: bool) -> None:
        self._merge_domains = merge_domains
        self._domains: dict[str, DescriptorNode] = {}
        self._rules: list[RateLimitRule] = []
        self._files: list[str] = []

    def add_file(self, spec: FileSpec, *, keep: bool = True) -> list[ConfigError]:
        """Load one file's domain and return its errors; a file with errors leaves nothing
        behind. `keep=False` (its parse found errors) checks the spec for more, never keeps it."""
        errors = _FileErrors(spec.file)
        domain = spec.domain
        existing = None
        if domain == "":
            errors.add("config file cannot have empty domain (key 'domain')", "domain", spec.lines.of("domain"))
        elif domain is not None:
            existing = self._domains.get(domain)
            if existing is not None and not self._merge_domains:
                errors.add(f"duplicate domain '{domain}' in config file", domain, spec.lines.of("domain"))
                existing = None
        # Load into a fresh root, checking top-level keys against the domain's existing
        # ones as well, then commit: a failing file leaves the tree as it was.
        staging = DescriptorNode()
        rules: list[RateLimitRule] = []
        taken = existing.children if existing is not None else {}
        self._load_descriptors(errors, staging, domain or "", (), spec.descriptors, taken, rules)
        if errors.found or domain is None or not keep:
            return errors.found
        if existing is None:
            self._domains[domain] = staging
        else:
            existing.adopt(staging)
        self._rules.extend(rules)
        self._files.append(spec.file)
        return []

    def build(self) -> RateLimitConfig:
        return RateLimitConfig(self._domains, self._rules, self._files)

    def _load_descriptors(
        self,
        errors: _FileErrors,
        parent: DescriptorNode,
        parent_key: str,
        parent_parts: tuple[str, ...],
        descriptors: list[DescriptorSpec],
        taken: Mapping[str, DescriptorNode],
        rules: list[RateLimitRule],
    ) -> None:
        for descriptor in descriptors:
            lines = descriptor.lines
            if descriptor.key is None or descriptor.value is None:
                continue  # reported by the parser; its children would all be guesses
            if not descriptor.key:
                errors.add("descriptor has empty key (key 'key')", "key", lines.line)
                continue
            # The Go composite key: "key" or "key_value"; it names the node everywhere.
            segment = f"{descriptor.key}_{descriptor.value}" if descriptor.value else descriptor.key
            full_key = f"{parent_key}.{segment}"
            duplicate = segment in parent.children or segment in taken
            if duplicate:
                errors.add(f"duplicate descriptor composite key '{full_key}'", full_key, lines.of("key"))
            rule = None
            if descriptor.rate_limit is not None:
                rule = _make_rule(errors, descriptor, descriptor.rate_limit, full_key)
                if rule is not None:
                    rules.append(rule)
            if descriptor.share_threshold and "*" not in segment:
                errors.add(
                    "share_threshold can only be used with wildcard values (containing '*'), "
                    f"but found key '{segment}'",
                    full_key,
                    lines.of("share_threshold"),
                )
            node = DescriptorNode(
                segment=segment,
                stats_key=full_key,
                stats_key_parts=(*parent_parts, segment),
                rule=rule,
                value_to_metric=descriptor.value_to_metric,
                share_threshold=descriptor.share_threshold,
            )
            self._load_descriptors(errors, node, full_key, node.stats_key_parts, descriptor.descriptors, {}, rules)
            if not duplicate:
                parent.add_child(node)


class _FileErrors:
    """The errors found in one file, collected so that one run reports them all."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.found: list[ConfigError] = []

    def add(self, message: str, key: str, line: int) -> None:
        self.found.append(ConfigError(self.file, message, key=key, line=line))


_UNIT_CHOICES = ", ".join(UNIT_NAMES)


def _make_rule(
    errors: _FileErrors, descriptor: DescriptorSpec, spec: RateLimitSpec, full_key: str
) -> RateLimitRule | None:
    """The rule of one rate_limit block, or None after adding its errors."""
    count = len(errors.found)
    unit_line = spec.lines.of("unit")
    unit: Unit | None = _UNITS_BY_NAME.get(spec.unit.upper()) if spec.unit is not None else None
    if spec.unlimited:
        if unit is not None:
            errors.add("should not specify rate limit unit when unlimited", "unit", unit_line)
        unit = Unit.UNKNOWN  # Go ignores an unparseable unit on an unlimited rule
    elif spec.unit is None:
        errors.add(
            f"missing rate limit unit for '{full_key}': set key 'unit' to one of {_UNIT_CHOICES} (or unlimited: true)",
            "unit",
            spec.lines.line,
        )
    elif unit is None:
        errors.add(
            f"invalid rate limit unit '{spec.unit}' for key 'unit' (valid units: {_UNIT_CHOICES})", "unit", unit_line
        )
    for replaced, line in spec.replaces:
        if not replaced:
            errors.add("should not have an empty replaces entry (key 'replaces')", "replaces", line)
        elif replaced == spec.name:
            errors.add("replaces should not contain name of same descriptor (key 'replaces')", "replaces", line)
    algorithm = Algorithm.SLIDING_WINDOW
    if spec.algorithm:
        found = _ALGORITHMS_BY_NAME.get(spec.algorithm.lower())
        if found is None:
            expected = ", ".join(_ALGORITHMS_BY_NAME)
            errors.add(
                f"invalid rate limit algorithm '{spec.algorithm}' for key 'algorithm' (valid algorithms: {expected})",
                "algorithm",
                spec.lines.of("algorithm"),
            )
        else:
            algorithm = found
    if len(errors.found) > count or unit is None:
        return None
    return RateLimitRule(
        full_key=full_key,
        requests_per_unit=spec.requests_per_unit,
        unit=unit,
        unlimited=spec.unlimited,
        name=spec.name,
        replaces=tuple(replaced for replaced, _ in spec.replaces),
        shadow_mode=descriptor.shadow_mode,
        quota_mode=descriptor.quota_mode,
        detailed_metric=descriptor.detailed_metric,
        algorithm=algorithm,
        metadata=descriptor.metadata,
    )
