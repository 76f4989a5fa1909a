"""Reading one config file into typed descriptor specs, with the Go server's checks.

Two passes, in envoyproxy/ratelimit's order, so the same file fails with the same error:
1. every key is checked against the known set, anywhere in the file (Go's validateYamlKeys);
2. the typed fields are decoded (Go's yaml.Unmarshal into YamlRoot), where a value of the
   wrong type is an error naming its key and line.
The tree itself is built by `config.loader`.
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
class RateLimitSpec:
    """A `rate_limit` block as decoded, before its unit and algorithm are checked."""

    requests_per_unit: int
    unit: str
    unlimited: bool
    name: str
    replaces: list[str]
    algorithm: str


@dataclass
class DescriptorSpec:
    """One entry of a `descriptors` list as decoded."""

    key: str
    value: str
    rate_limit: RateLimitSpec | None
    descriptors: list[DescriptorSpec]
    shadow_mode: bool
    quota_mode: bool
    detailed_metric: bool
    value_to_metric: bool
    share_threshold: bool
    metadata: Mapping[str, Any] | None


@dataclass
class FileSpec:
    """One config file as decoded: its domain and top-level descriptors."""

    file: str
    domain: str
    descriptors: list[DescriptorSpec] = field(default_factory=list)


def parse_file(file: str) -> FileSpec:
    """Read, key-check and decode one file; raise `ConfigError` naming it."""
    try:
        with open(file, encoding="utf-8") as stream:
            text = stream.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(file, os_error_text(error)) from error
    try:
        document = read_yaml(text)
    except NonStringKeyError as error:
        raise ConfigError(file, str(error)) from error
    except YamlReadError as error:
        raise ConfigError(file, f"error loading config file: {error}") from error
    if document is None:
        document = YamlMap(line=1)  # an empty file: yaml.v2 leaves the map empty
    if not isinstance(document, YamlMap):
        raise ConfigError(
            file,
            f"error loading config file: line {document.line}: cannot unmarshal "
            f"{document.describe()} into a map (the top level must be a map)",
        )
    _validate_keys(file, document)
    return _Decoder(file).file_spec(document)


def os_error_text(error: Exception) -> str:
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return f"error loading config file: {reason}"


def _validate_keys(file: str, mapping: YamlMap) -> None:
    """Go's validateYamlKeys: keys are known strings, lists hold maps, leaves are plain."""
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise ConfigError(file, f"config error, key is not of type string: {go_format(key)}")
        if key not in VALID_KEYS:
            raise ConfigError(file, f"config error, unknown key '{key}'", key=key)
        if key == "metadata":
            continue  # free-form: its keys are the operator's
        if isinstance(value, YamlSeq):
            for element in value:
                if not isinstance(element, YamlMap):
                    raise ConfigError(
                        file,
                        "config error, yaml file contains list of type other than map: "
                        f"{go_format(element)} (in list '{key}')",
                        key=key,
                    )
                _validate_keys(file, element)
        elif isinstance(value, YamlMap):
            _validate_keys(file, value)
        elif isinstance(value, Scalar) and not _is_plain_leaf(value.value):
            # yaml.v2 decodes floats and integers beyond int64 into types the Go
            # validator does not accept as leaves.
            raise ConfigError(
                file,
                f"error checking config: line {value.line}: unsupported value {value.describe()} for key '{key}'",
                key=key,
            )


def _is_plain_leaf(value: object) -> bool:
    if isinstance(value, (str, bool)):
        return True
    if isinstance(value, int):
        return value in _INT64_RANGE
    return False


class _Decoder:
    """Go's typed yaml.Unmarshal: scalars convert into string fields by their source text."""

    def __init__(self, file: str) -> None:
        self._file = file

    def file_spec(self, root: YamlMap) -> FileSpec:
        return FileSpec(
            file=self._file,
            domain=self._string(root, "domain"),
            descriptors=self._descriptors(root),
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
        )

    def _rate_limit(self, mapping: YamlMap) -> RateLimitSpec | None:
        node = mapping.get("rate_limit")
        if node is None:
            return None  # absent or `rate_limit:` with nothing: no limit, as in Go
        if not isinstance(node, YamlMap):
            raise self._type_error(mapping, "rate_limit", node, "a rate_limit map")
        replaces = self._sequence(node, "replaces", "a list of replaces")
        return RateLimitSpec(
            requests_per_unit=self._uint32(node, "requests_per_unit"),
            unit=self._string(node, "unit"),
            unlimited=self._bool(node, "unlimited"),
            name=self._string(node, "name"),
            replaces=[self._string(entry, "name") for entry in replaces],
            algorithm=self._string(node, "algorithm"),
        )

    def _metadata(self, mapping: YamlMap) -> Mapping[str, Any] | None:
        node = mapping.get("metadata")
        if node is None:
            return None
        if not isinstance(node, YamlMap):
            raise self._type_error(mapping, "metadata", node, "a metadata map")
        frozen = _freeze(node)
        return frozen if frozen else None  # Go keeps no metadata for an empty map

    def _string(self, mapping: YamlMap, key: str) -> str:
        node = mapping.get(key)
        if node is None:
            return ""
        if not isinstance(node, Scalar):
            raise self._type_error(mapping, key, node, "string")
        # yaml.v2 puts the source text of a non-string scalar into a string field.
        return node.value if isinstance(node.value, str) else node.text

    def _bool(self, mapping: YamlMap, key: str) -> bool:
        node = mapping.get(key)
        if node is None:
            return False
        if not isinstance(node, Scalar) or not isinstance(node.value, bool):
            raise self._type_error(mapping, key, node, "bool")
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
            raise self._type_error(
                mapping,
                key,
                node,
                "uint32",
                hint=" (must be a non-negative integer < 2**32)",
            )
        return node.value

    def _sequence(self, mapping: YamlMap, key: str, target: str) -> list[YamlMap]:
        node = mapping.get(key)
        if node is None:
            return []
        if not isinstance(node, YamlSeq):
            raise self._type_error(mapping, key, node, target)
        return list(node)  # the key validator already made sure these are maps

    def _type_error(
        self,
        mapping: YamlMap,
        key: str,
        node: YamlValue,
        target: str,
        *,
        hint: str = "",
    ) -> ConfigError:
        line = node.line if node is not None else mapping.key_lines.get(key, mapping.line)
        shown = node.describe() if node is not None else "!!null"
        return ConfigError(
            self._file,
            f"error loading config file: line {line}: cannot unmarshal {shown} into {target} for key '{key}'{hint}",
            key=key,
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
