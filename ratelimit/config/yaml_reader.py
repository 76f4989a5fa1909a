"""Reading a config file's YAML the way the Go server's yaml.v2 sees it.

`yaml.safe_load` loses two things the Go loader depends on: the source text of a scalar
(yaml.v2 decodes `value: 0x10` or `value: yes` into a string field as "0x10" / "yes") and
line numbers for error messages. So this module composes the node graph with PyYAML's
safe machinery and converts it into `YamlMap` / `YamlSeq` / `Scalar`, which keep both.
Timestamps stay strings, as yaml.v2 leaves them when decoding into interface{}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import yaml

_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MERGE_TAG = "tag:yaml.org,2002:merge"

_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _GoLikeLoader(_BaseLoader):  # type: ignore[misc]
    """Safe loader without the implicit timestamp type (yaml.v2 keeps those as strings)."""


_GoLikeLoader.yaml_implicit_resolvers = {
    first_char: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP_TAG]
    for first_char, resolvers in _BaseLoader.yaml_implicit_resolvers.items()
}


@dataclass(frozen=True, slots=True)
class Scalar:
    """A scalar with its resolved Python value, its source text and its YAML tag name."""

    value: Any
    text: str
    tag: str  # short name: "str", "int", "float", "bool", "null", ...
    line: int

    def describe(self) -> str:
        return f"!!{self.tag} `{self.text}`"


class YamlMap(dict):  # type: ignore[type-arg]
    """A mapping keyed by resolved key values, remembering each key's line.

    `duplicate_keys` lists (key, line, first line) of every key written twice in this map:
    YAML forbids it, yet PyYAML (like yaml.v2) keeps the last value without a word, so a
    second `rate_limit:` would silently replace the first. Keys merged in by `<<` are not
    duplicates: overriding them is what merging is for.
    """

    __slots__ = ("duplicate_keys", "key_lines", "line")

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.key_lines: dict[Any, int] = {}
        self.duplicate_keys: list[tuple[Any, int, int]] = []

    def describe(self) -> str:
        return "!!map"


class YamlSeq(list):  # type: ignore[type-arg]
    """A sequence, remembering its line."""

    __slots__ = ("line",)

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line

    def describe(self) -> str:
        return "!!seq"


YamlValue = YamlMap | YamlSeq | Scalar | None


class YamlReadError(Exception):
    """The text is not YAML (or not a kind of YAML a config can hold); `line` when known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


def read_yaml(text: str) -> YamlValue:
    """Parse the first YAML document of `text`; yaml.v2's Unmarshal also reads only the first."""
    loader = _GoLikeLoader(text)
    try:
        if not loader.check_node():
            return None
        root = loader.get_node()
        return _Converter(loader).convert(root)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise YamlReadError(_describe_yaml_error(error), mark.line + 1 if mark is not None else None) from error
    finally:
        loader.dispose()


def _describe_yaml_error(error: yaml.YAMLError) -> str:
    # One line, in the shape of yaml.v2's "yaml: line 2: found unexpected end of stream".
    # The line goes to the error's own field, in front of the message.
    problem = getattr(error, "problem", None)
    if problem is None:
        return f"yaml: {' '.join(str(error).split())}"
    context = getattr(error, "context", None)
    return f"yaml: {problem}" + (f" ({context})" if context else "")


class _Converter:
    def __init__(self, loader: Any) -> None:
        self._loader = loader
        # Ids of the nodes being converted, to refuse recursive aliases.
        self._active: set[int] = set()

    def convert(self, node: yaml.Node) -> YamlValue:
        line = node.start_mark.line + 1
        if isinstance(node, yaml.ScalarNode):
            value = self._loader.construct_object(node, deep=True)
            if value is None:
                return None
            return Scalar(value=value, text=node.value, tag=_short_tag(node.tag), line=line)
        if id(node) in self._active:
            raise YamlReadError("yaml: recursive alias", line)
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                seq = YamlSeq(line)
                seq.extend(self.convert(item) for item in node.value)
                return seq
            assert isinstance(node, yaml.MappingNode)
            return self._convert_mapping(node, line)
        finally:
            self._active.discard(id(node))

    def _convert_mapping(self, node: yaml.MappingNode, line: int) -> YamlMap:
        own_keys = {id(key_node) for key_node, _ in node.value if key_node.tag != _MERGE_TAG}
        self._loader.flatten_mapping(node)  # resolves `<<` merge keys, as yaml.v2 does
        mapping = YamlMap(line)
        own_lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = self.convert(key_node)
            if isinstance(key, (YamlMap, YamlSeq)):
                # Not hashable; report it as the Go validator would: a non-string key.
                raise NonStringKeyError(go_format(key), key_node.start_mark.line + 1)
            key_value = key.value if isinstance(key, Scalar) else None
            key_line = key_node.start_mark.line + 1
            if id(key_node) in own_keys:
                if key_value in own_lines:
                    mapping.duplicate_keys.append((key_value, key_line, own_lines[key_value]))
                else:
                    own_lines[key_value] = key_line
            mapping[key_value] = self.convert(value_node)
            mapping.key_lines[key_value] = key_line
        return mapping


class NonStringKeyError(YamlReadError):
    """A collection used as a mapping key; yaml.v2 accepts it, the Go validator refuses it."""

    def __init__(self, shown: str, line: int) -> None:
        super().__init__(f"config error, key is not of type string: {shown}", line)


def _short_tag(tag: str) -> str:
    prefix = "tag:yaml.org,2002:"
    return tag.removeprefix(prefix)


def go_format(value: Any) -> str:
    """Format a value as Go's fmt `%v` prints what yaml.v2 decoded (for error messages)."""
    if isinstance(value, Scalar):
        value = value.value
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, list):  # YamlSeq included
        return "[" + " ".join(go_format(item) for item in value) + "]"
    if isinstance(value, dict):
        # Go prints maps with their keys sorted.
        shown = sorted((go_format(key), go_format(item)) for key, item in value.items())
        return "map[" + " ".join(f"{key}:{item}" for key, item in shown) + "]"
    return str(value)


def _go_float(number: float) -> str:
    # %v of a float64 is %g with the shortest digits, switching to an exponent when the
    # decimal exponent is below -4 or at least 6 (Go: 1e+06, 0.25, 1.5e-05).
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    if number == 0:
        return "-0" if math.copysign(1.0, number) < 0 else "0"
    sign, digit_tuple, exponent = Decimal(repr(number)).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    assert isinstance(exponent, int)
    decimal_exponent = len(digits) + exponent - 1
    text_sign = "-" if sign else ""
    if decimal_exponent < -4 or decimal_exponent >= 6:
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        exp_sign = "-" if decimal_exponent < 0 else "+"
        return f"{text_sign}{mantissa}e{exp_sign}{abs(decimal_exponent):02d}"
    return text_sign + format(Decimal(repr(abs(number))).normalize(), "f")
