"""The loaded rule tree and its lookup: which limit a request descriptor gets.

Matching follows envoyproxy/ratelimit's GetLimit (src/config/config_impl.go): at each level
the exact "key_value" node wins, then the wildcard nodes in config order, then the key-only
default; a limit applies only at the node reached by the request's last entry, and the walk
stops at a node without children. The stats key is the Go server's too, including
detailed_metric, value_to_metric and share_threshold.

Everything a request needs is precomputed at load: dicts keyed by the Go composite key
("key_value"), wildcard patterns pre-split on "*", each node's stats key and its parts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from ratelimit.config.model import Match, RateLimitRule, Unit

# One wildcard child of a node: (composite key, literal prefix, literal suffix,
# literal middle parts, sum of literal lengths, child node).
_Wildcard = tuple[str, str, str, tuple[str, ...], int, "DescriptorNode"]


class DescriptorNode:
    """One descriptor of the config (or a domain's root), immutable once loading is done."""

    __slots__ = (
        "children",
        "rule",
        "segment",
        "share_threshold",
        "stats_key",
        "stats_key_parts",
        "value_to_metric",
        "wildcards",
    )

    def __init__(
        self,
        *,
        segment: str = "",
        stats_key: str = "",
        stats_key_parts: tuple[str, ...] = (),
        rule: RateLimitRule | None = None,
        value_to_metric: bool = False,
        share_threshold: bool = False,
    ) -> None:
        self.segment = segment  # the Go composite key: "key" or "key_value"
        self.stats_key = stats_key  # "<domain>.<segment>.<segment>..."
        self.stats_key_parts = stats_key_parts
        self.rule = rule
        self.value_to_metric = value_to_metric
        # share_threshold is only accepted on a segment containing "*", so the segment
        # itself is the wildcard pattern that matching values share.
        self.share_threshold = share_threshold
        self.children: dict[str, DescriptorNode] = {}
        self.wildcards: tuple[_Wildcard, ...] = ()

    def add_child(self, child: DescriptorNode) -> None:
        self.children[child.segment] = child
        if "*" in child.segment:
            self.wildcards += (_split_wildcard(child),)

    def adopt(self, other: DescriptorNode) -> None:
        """Take `other`'s children after ours (merging one file's domain into another's)."""
        self.children.update(other.children)
        self.wildcards += other.wildcards


def _split_wildcard(child: DescriptorNode) -> _Wildcard:
    # Each "*" matches any run of characters, possibly empty, anywhere in the composite key.
    parts = child.segment.split("*")
    middles = tuple(parts[1:-1])
    return (child.segment, parts[0], parts[-1], middles, sum(map(len, parts)), child)


def _wildcard_matches(
    composite: str,
    prefix: str,
    suffix: str,
    middles: tuple[str, ...],
    literal_length: int,
) -> bool:
    if len(composite) < literal_length:
        return False
    if not composite.startswith(prefix) or not composite.endswith(suffix):
        return False
    if not middles:
        return True
    # Leftmost placement of each middle literal, between the prefix and the suffix.
    end = len(composite) - len(suffix)
    position = len(prefix)
    for part in middles:
        found = composite.find(part, position, end)
        if found < 0:
            return False
        position = found + len(part)
    return True


class RateLimitConfig:
    """The limits of all loaded files, by domain. Immutable after load; lookups are lock-free."""

    __slots__ = ("_domains", "_files", "_rules")
    _domains: dict[str, DescriptorNode]
    _files: tuple[str, ...]
    _rules: tuple[RateLimitRule, ...]

    def __init__(
        self,
        domains: Mapping[str, DescriptorNode],
        rules: Sequence[RateLimitRule],
        files: Sequence[str] = (),
    ) -> None:
        # Shared by every request thread without locks, so it must never change.
        object.__setattr__(self, "_domains", dict(domains))
        object.__setattr__(self, "_rules", tuple(rules))
        object.__setattr__(self, "_files", tuple(files))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    @classmethod
    def empty(cls) -> RateLimitConfig:
        return cls({}, ())

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(self._domains)

    @property
    def files(self) -> tuple[str, ...]:
        """The config files this was loaded from, in load order."""
        return self._files

    def has_domain(self, domain: str) -> bool:
        return domain in self._domains

    def rules(self) -> Iterator[RateLimitRule]:
        """Every configured rule (unlimited ones included), in config order."""
        return iter(self._rules)

    def rule_stats_keys(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        """(domain, stats key parts) of every node with a limit, for metric labels."""
        for domain, root in self._domains.items():
            pending = list(root.children.values())
            while pending:
                node = pending.pop()
                if node.rule is not None and not node.rule.unlimited:
                    yield domain, node.stats_key_parts
                pending.extend(node.children.values())

    def summary(self) -> str:
        """What was loaded, for log lines and `validate-config`: "1 domain (svc), 3 rules from 1 file"."""

        def counted(number: int, noun: str) -> str:
            return f"{number} {noun}{'' if number == 1 else 's'}"

        return (
            f"{counted(len(self._domains), 'domain')} ({', '.join(self._domains)}), "
            f"{counted(len(self._rules), 'rule')} from {counted(len(self._files), 'file')}"
        )

    def __repr__(self) -> str:
        return f"RateLimitConfig(domains={list(self._domains)}, rules={len(self._rules)})"

    def lookup(
        self,
        domain: str,
        entries: Sequence[tuple[str, str]],
        override: tuple[int, Unit] | None = None,
    ) -> Match | None:
        """The limit for one request descriptor, or None when nothing applies.

        `override` is the descriptor's own limit from the request (requests_per_unit, unit);
        like the Go server it wins over the config whenever the domain is known.
        """
        root = self._domains.get(domain)
        if root is None:
            return None
        if override is not None:
            return _override_match(domain, entries, override)
        if not entries:
            return None

        node = root
        last = len(entries) - 1
        segments: list[str] = []
        # Whether some level's stats segment differs from the config node's segment.
        dynamic = False
        # Entry index -> the wildcard pattern its share_threshold level shares.
        patterns: dict[int, str] | None = None
        found: DescriptorNode | None = None
        for index, (key, value) in enumerate(entries):
            composite = f"{key}_{value}"
            child = node.children.get(composite)
            if child is not None:
                if value:
                    segments.append(child.segment)  # == composite
                else:
                    # Go shows an empty value as the bare key, whatever the node is called.
                    segments.append(key)
                    dynamic = dynamic or key != child.segment
            else:
                wildcard_key = ""
                for candidate, prefix, suffix, middles, length, target in node.wildcards:
                    if _wildcard_matches(composite, prefix, suffix, middles, length):
                        child, wildcard_key = target, candidate
                        break
                if child is not None:
                    shown = _wildcard_segment_value(child, wildcard_key, key, value)
                    if child.share_threshold:
                        if patterns is None:
                            patterns = {}
                        patterns[index] = shown
                    segment = f"{key}_{shown}" if shown else key
                    if segment != child.segment:
                        dynamic = True
                    segments.append(segment)
                else:
                    child = node.children.get(key)
                    if child is None:
                        return None
                    if child.value_to_metric and value:
                        dynamic = True
                        segments.append(composite)
                    else:
                        segments.append(key)
            if index == last:
                found = child
            elif not child.children:
                # More request entries than config depth: no limit (Go stops descending).
                return None
            node = child

        if found is None or found.rule is None:
            return None
        rule = found.rule
        if rule.detailed_metric:
            segments = _detailed_segments(entries, patterns)
            stats_key_parts = tuple(segments)
            stats_key = f"{domain}.{'.'.join(segments)}"
        elif dynamic:
            stats_key_parts = tuple(segments)
            stats_key = f"{domain}.{'.'.join(segments)}"
        else:
            stats_key, stats_key_parts = found.stats_key, found.stats_key_parts

        if patterns is None:
            counter_entries = tuple(entries) if not isinstance(entries, tuple) else entries
            shared = None
        else:
            counter_entries = tuple((key, patterns.get(index, value)) for index, (key, value) in enumerate(entries))
            shared = tuple(patterns.get(index, "") for index in range(len(entries)))
        return Match(
            rule=rule,
            stats_key=stats_key,
            stats_key_parts=stats_key_parts,
            counter_entries=counter_entries,
            share_threshold_patterns=shared,
        )


def _wildcard_segment_value(child: DescriptorNode, wildcard_key: str, key: str, value: str) -> str:
    """The value part Go's stats key shows for a level matched by a wildcard node."""
    # share_threshold wins over value_to_metric: every value matching the pattern shares
    # one counter, so it must share one stats key too.
    if child.value_to_metric and not child.share_threshold:
        return value
    return wildcard_key.removeprefix(f"{key}_")


def _detailed_segments(entries: Sequence[tuple[str, str]], patterns: dict[int, str] | None) -> list[str]:
    if patterns is None:
        # Go writes "key_value" even for an empty value here ("key_").
        return [f"{key}_{value}" for key, value in entries]
    segments = []
    for index, (key, value) in enumerate(entries):
        shown = patterns.get(index) or value
        segments.append(f"{key}_{shown}" if shown else key)
    return segments


def _override_match(domain: str, entries: Sequence[tuple[str, str]], override: tuple[int, Unit]) -> Match:
    # The Go server synthesizes a plain rule (never shadow, no name) keyed by the entries.
    requests_per_unit, unit = override
    try:
        unit = Unit(unit)
    except ValueError:
        unit = Unit.UNKNOWN
    segments = tuple(f"{key}_{value}" if value else key for key, value in entries)
    stats_key = f"{domain}.{'.'.join(segments)}"
    rule = RateLimitRule(full_key=stats_key, requests_per_unit=requests_per_unit, unit=unit)
    return Match(
        rule=rule,
        stats_key=stats_key,
        stats_key_parts=segments,
        counter_entries=tuple(entries) if not isinstance(entries, tuple) else entries,
    )
