"""Reading one config file into typed descriptor specs, with the Go server's checks.

Two passes, in envoyproxy/ratelimit's order, so the same file fails with the same error:
1. every key is checked against the known set, anywhere in the file (Go's validateYamlKeys),
   and a key written twice in one map is an error (Go keeps the last one silently);
2. the typed fields are decoded (Go's yaml.Unmarshal into YamlRoot), where a value of the
   wrong type is an error naming its key and line.
Where Go stops at the first error, both passes go on and collect every error of the file
(a value that failed to decode reads as None, so it causes no second error). The specs keep
each key's line, for the errors the tree builder (`config.loader`) finds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ratelimit.config.errors import ConfigError
from ratelimit.config.yaml_reader import (
    NonStringKeyError,
    Scalar,
    YamlMap,
    YamlReadError,
    YamlSeq,
    YamlValue,
    go_format,
    read_yaml,
)

# Go's validKeys: any of these is accepted at any level (and ignored where it means
# nothing), anything else is an error. `algorithm` is this project's addition.
VALID_KEYS = frozenset(
    {
        "domain",
        "key",
        "value",
        "descriptors",
        "rate_limit",
        "unit",
        "requests_per_unit",
        "unlimited",
        "shadow_mode",
        "quota_mode",
        "name",
        "replaces",
        "detailed_metric",
        "value_to_metric",
        "share_threshold",
        "metadata",
        "algorithm",
    }
)


_UINT32_LIMIT = 2**32
_INT64_RANGE = range(-(2**63), 2**63)


@dataclass
class Lines:
    """Where a map and its keys are in the file."""

    line: int
    key_lines: Mapping[str, int] = field(default_factory=dict)

    def of(self, key: str) -> int:
        """The line of `key`, or of the map when the key is absent."""
        return self.key_lines.get(key, self.line)

    @classmethod
    def of_map(cls, mapping: YamlMap) -> Lines:
        return cls(mapping.line, {key: line for key, line in mapping.key_lines.items() if isinstance(key, str)})


@dataclass
class RateLimitSpec:
    """A `rate_limit` block as decoded, before its unit and algorithm are checked.

    `unit` is None when the key is absent; `replaces` holds (name, line) pairs.
    """

    requests_per_unit: int
    unit: str | None
    unlimited: bool
    name: str
    replaces: list[tuple[str, int]]
    algorithm: str
    lines: Lines


@dataclass
class DescriptorSpec:
    """One entry of a `descriptors` list as decoded (`key` None: it failed to decode)."""

    key: str | None
    value: str | None
    rate_limit: RateLimitSpec | None
    descriptors: list[DescriptorSpec]
    shadow_mode: bool
    quota_mode: bool
    detailed_metric: bool
    value_to_metric: bool
    share_threshold: bool
    metadata: Mapping[str, Any] | None
    lines: Lines


@dataclass
class FileSpec:
    """One config file as decoded: its domain (None: it failed to decode) and descriptors."""

    file: str
    domain: str | None
    descriptors: list[DescriptorSpec] = field(default_factory=list)
    lines: Lines = field(default_factory=lambda: Lines(1))


def parse_file(file: str) -> tuple[FileSpec | None, list[ConfigError]]:
    """Read, key-check and decode one file: its spec (None when unreadable) and every error."""
    try:
        with open(file, encoding="utf-8") as stream:
            text = stream.read()
    except (OSError, UnicodeDecodeError) as error:
        return None, [ConfigError(file, os_error_text(error))]
    try:
        document = read_yaml(text)
    except NonStringKeyError as error:
        return None, [ConfigError(file, str(error), line=error.line)]
    except YamlReadError as error:
        return None, [ConfigError(file, f"error loading config file: {error}", line=error.line)]
    if document is None:
        document = YamlMap(line=1)  # an empty file: yaml.v2 leaves the map empty
    if not isinstance(document, YamlMap):
        return None, [
            ConfigError(
                file,
                f"error loading config file: cannot unmarshal {document.describe()} into a map "
                "(the top level must be a map)",
                line=document.line,
            )
        ]
    errors: list[ConfigError] = []
    _validate_keys(file, document, errors)
    # A value both passes refuse (a float leaf, a list for a string) is reported once.
    refused = {(error.line, error.key) for error in errors}
    decode_errors: list[ConfigError] = []
    spec = _Decoder(file, decode_errors).file_spec(document)
    errors.extend(error for error in decode_errors if (error.line, error.key) not in refused)
    return spec, errors


def os_error_text(error: Exception) -> str:
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return f"error loading config file: {reason}"


def _validate_keys(file: str, mapping: YamlMap, errors: list[ConfigError]) -> None:
    """Go's validateYamlKeys: keys are known strings, lists hold maps, leaves are plain.
    Also: no key twice in one map."""
    for key, line, first_line in mapping.duplicate_keys:
        errors.append(
            ConfigError(
                file,
                f"config error, duplicate key '{go_format(key)}' (first on line {first_line}; "
                "YAML would keep only the last one)",
                key=go_format(key),
                line=line,
            )
        )
    for key, value in mapping.items():
        line = mapping.key_lines.get(key, mapping.line)
        if not isinstance(key, str):
            errors.append(ConfigError(file, f"config error, key is not of type string: {go_format(key)}", line=line))
            continue
        if key not in VALID_KEYS:
            errors.append(ConfigError(file, f"config error, unknown key '{key}'", key=key, line=line))
            continue
        if key == "metadata":
            continue  # free-form: its keys are the operator's
        if isinstance(value, YamlSeq):
            for element in value:
                if not isinstance(element, YamlMap):
                    errors.append(
                        ConfigError(
                            file,
                            "config error, yaml file contains list of type other than map: "
                            f"{go_format(element)} (in list '{key}')",
                            key=key,
                            line=element.line if element is not None else value.line,
                        )
                    )
                    continue
                _validate_keys(file, element, errors)
        elif isinstance(value, YamlMap):
            _validate_keys(file, value, errors)
        elif isinstance(value, Scalar) and not _is_plain_leaf(value.value):
            # yaml.v2 decodes floats and integers beyond int64 into types the Go
            # validator does not accept as leaves.
            errors.append(
                ConfigError(
                    file,
                    f"error checking config: unsupported value {value.describe()} for key '{key}'",
                    key=key,
                    line=value.line,
                )
            )


def _is_plain_leaf(value: object) -> bool:
    if isinstance(value, (str, bool)):
        return True
    if isinstance(value, int):
        return value in _INT64_RANGE
    return False


class _Decoder:
    """Go's typed yaml.Unmarshal: scalars convert into string fields by their source text.

    A value of the wrong type is recorded in `errors` and decodes as None (or as its
    field's zero value where nothing downstream checks it), so decoding goes on.
    """

    def __init__(self, file: str, errors: list[ConfigError]) -> None:
        self._file = file
        self._errors = errors

    def file_spec(self, root: YamlMap) -> FileSpec:
        return FileSpec(
            file=self._file,
            domain=self._string(root, "domain"),
            descriptors=self._descriptors(root),
            lines=Lines.of_map(root),
        )

    def _descriptors(self, mapping: YamlMap) -> list[DescriptorSpec]:
        items = self._sequence(mapping, "descriptors", "a list of descriptors")
        return [self._descriptor(item) for item in items]

    def _descriptor(self, mapping: YamlMap) -> DescriptorSpec:
        return DescriptorSpec(
            key=self._string(mapping, "key"),
            value=self._string(mapping, "value"),
            rate_limit=self._rate_limit(mapping),
            descriptors=self._descriptors(mapping),
            shadow_mode=self._bool(mapping, "shadow_mode"),
            quota_mode=self._bool(mapping, "quota_mode"),
            detailed_metric=self._bool(mapping, "detailed_metric"),
            value_to_metric=self._bool(mapping, "value_to_metric"),
            share_threshold=self._bool(mapping, "share_threshold"),
            metadata=self._metadata(mapping),
            lines=Lines.of_map(mapping),
        )

    def _rate_limit(self, mapping: YamlMap) -> RateLimitSpec | None:
        node = mapping.get("rate_limit")
        if node is None:
            return None  # absent or `rate_limit:` with nothing: no limit, as in Go
        if not isinstance(node, YamlMap):
            self._type_error(mapping, "rate_limit", node, "a rate_limit map")
            return None
        errors_before = len(self._errors)
        replaces = self._sequence(node, "replaces", "a list of replaces")
        spec = RateLimitSpec(
            requests_per_unit=self._uint32(node, "requests_per_unit"),
            # `unit:` with nothing, like no `unit` at all, is a missing unit.
            unit=self._string(node, "unit") if node.get("unit") is not None else None,
            unlimited=self._bool(node, "unlimited"),
            name=self._string(node, "name") or "",
            replaces=[(self._string(entry, "name") or "", entry.line) for entry in replaces],
            algorithm=self._string(node, "algorithm") or "",
            lines=Lines.of_map(node),
        )
        # A block with a value that did not decode is already reported: checking the rest
        # of it would only report the same mistake twice (a unit that is a list, then missing).
        return spec if len(self._errors) == errors_before else None

    def _metadata(self, mapping: YamlMap) -> Mapping[str, Any] | None:
        node = mapping.get("metadata")
        if node is None:
            return None
        if not isinstance(node, YamlMap):
            self._type_error(mapping, "metadata", node, "a metadata map")
            return None
        frozen = _freeze(node)
        return frozen if frozen else None  # Go keeps no metadata for an empty map

    def _string(self, mapping: YamlMap, key: str) -> str | None:
        node = mapping.get(key)
        if node is None:
            return ""
        if not isinstance(node, Scalar):
            self._type_error(mapping, key, node, "string")
            return None
        # yaml.v2 puts the source text of a non-string scalar into a string field.
        return node.value if isinstance(node.value, str) else node.text

    def _bool(self, mapping: YamlMap, key: str) -> bool:
        node = mapping.get(key)
        if node is None:
            return False
        if not isinstance(node, Scalar) or not isinstance(node.value, bool):
            self._type_error(mapping, key, node, "bool", hint=" (expected true or false)")
            return False
        return node.value

    def _uint32(self, mapping: YamlMap, key: str) -> int:
        node = mapping.get(key)
        if node is None:
            return 0
        if (
            not isinstance(node, Scalar)
            or isinstance(node.value, bool)
            or not isinstance(node.value, int)
            or not 0 <= node.value < _UINT32_LIMIT
        ):
            self._type_error(mapping, key, node, "uint32", hint=" (must be a non-negative integer < 2**32)")
            return 0
        return node.value

    def _sequence(self, mapping: YamlMap, key: str, target: str) -> list[YamlMap]:
        node = mapping.get(key)
        if node is None:
            return []
        if not isinstance(node, YamlSeq):
            self._type_error(mapping, key, node, target)
            return []
        # Elements that are not maps were reported by the key validator.
        return [element for element in node if isinstance(element, YamlMap)]

    def _type_error(
        self,
        mapping: YamlMap,
        key: str,
        node: YamlValue,
        target: str,
        *,
        hint: str = "",
    ) -> None:
        line = node.line if node is not None else mapping.key_lines.get(key, mapping.line)
        shown = node.describe() if node is not None else "!!null"
        self._errors.append(
            ConfigError(
                self._file,
                f"error loading config file: cannot unmarshal {shown} into {target} for key '{key}'{hint}",
                key=key,
                line=line,
            )
        )


def _freeze(node: YamlValue) -> Any:
    """Metadata as read-only data: maps become mapping proxies with string keys, lists tuples."""
    if isinstance(node, YamlMap):
        return MappingProxyType(
            {key if isinstance(key, str) else go_format(key): _freeze(v) for key, v in node.items()}
        )
    if isinstance(node, YamlSeq):
        return tuple(_freeze(item) for item in node)
    if isinstance(node, Scalar):
        return node.value
    return None
