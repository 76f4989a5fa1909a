"""The README's runnable examples, for the tests that run them as written.

An example is marked in README.md by `<!-- NAME:start -->` and `<!-- NAME:end -->` (the
convention of the Envoy example, `envoy-example`); `readme_block` returns what lies between,
and `fenced` the code blocks inside it.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"

_FENCE = re.compile(r"^```(?P<language>[\w-]*)\n(?P<body>.*?)^```\n", re.MULTILINE | re.DOTALL)


def readme_block(name: str) -> str:
    """The text between the README's `<!-- NAME:start -->` and `<!-- NAME:end -->` markers."""
    text = README.read_text(encoding="utf-8")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if text.count(start) != 1 or text.count(end) != 1:
        raise AssertionError(f"README.md must mark the {name!r} example once with {start} ... {end}")
    return text.split(start, 1)[1].split(end, 1)[0]


def fenced(block: str, language: str | None = None) -> list[str]:
    """The bodies of the fenced code blocks in `block`, those of `language` only when given
    ("" for a block without one)."""
    return [match["body"] for match in _FENCE.finditer(block) if language is None or match["language"] == language]


def shell_commands(script: str) -> list[str]:
    """The commands of a shell block: comments and blank lines dropped, `\\` continuations joined."""
    commands, pending = [], ""
    for line in script.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        commands.append((pending + line).strip())
        pending = ""
    return commands
