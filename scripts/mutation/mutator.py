"""Mutation testing of the modules that decide (see README, "Mutation testing").

Each mutant is one small change to one deciding module (an operator, a constant, a call,
a statement) or one textual change to the Lua script. It is written into a private copy of
the tree, never into the working tree, and that module's own fast test selection runs
against it: a failing (or hanging) run kills the mutant, a passing one lets it survive.

A surviving mutant is either a gap in the tests or equivalent (no test can tell it from the
original); equivalent ones are listed with their reason in `equivalent.txt` and are not run
(`--check-equivalents` runs them, to find stale entries). The score leaves them out.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import copy
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
EQUIVALENT_FILE = HERE / "equivalent.txt"
LUA_MUTATIONS_FILE = HERE / "lua_mutations.txt"
PASS_MARK = 0.90


@dataclasses.dataclass(frozen=True)
class Target:
    """A deciding module and the tests that must kill its mutants (fast ones, timing-free)."""

    path: str
    tests: tuple[str, ...]  # test files or node ids
    options: tuple[str, ...] = ()  # more pytest arguments (-k, --deselect)


# Test selections: the tests that exercise the module's decisions, without the slow
# throughput and timing tests (they check rates, which mutants of arithmetic break anyway
# in the exact tests first). Files that do not exist are left out.
_LIMITER_FAST = (
    "--deselect=tests/test_limiter.py::test_steady_over_limit_load_gets_at_least_95_percent_of_the_limit",
    "--deselect=tests/test_limiter.py::test_boundary_bursts_from_concurrent_clients_never_exceed_the_limit",
    "--deselect=tests/test_window_properties.py::test_a_steady_over_limit_rate_gets_at_least_95_percent_of_the_limit",
    "--deselect=tests/test_window_properties.py::test_any_constant_rate_gets_at_least_95_percent_of_a_perfect_sliding_log",
)
TARGETS = (
    Target(
        "ratelimit/limiter/window.py",
        ("tests/test_oracle_window.py", "tests/test_window_properties.py", "tests/test_limiter.py"),
        _LIMITER_FAST,
    ),
    # Wall-clock speed tests (constant-time eviction) fail under the load of parallel jobs,
    # which would count mutants as killed by noise: left out.
    Target(
        "ratelimit/limiter/keys.py",
        ("tests/test_oracle_keys.py", "tests/test_bounded_caches.py"),
        ("--deselect=tests/test_bounded_caches.py::test_key_cache_eviction_stays_constant_time",),
    ),
    Target(
        "ratelimit/limiter/cache.py",
        ("tests/test_over_limit_cache.py",),
        ("--deselect=tests/test_over_limit_cache.py::test_eviction_is_constant_time_with_many_distinct_full_counters",),
    ),
    Target("ratelimit/limiter/breaker.py", ("tests/test_breaker.py", "tests/test_breaker_probe.py")),
    Target("ratelimit/limiter/pipeline_window.py", ("tests/test_pipeline_window.py",)),
    Target(
        "ratelimit/config/matcher.py",
        (
            "tests/test_oracle_matcher.py",
            "tests/test_config_matcher.py",
            "tests/test_config_conformance.py",
            "tests/test_config_loader.py",
        ),
    ),
    Target("ratelimit/service.py", ("tests/test_service.py", "tests/test_readme_promises.py", "tests/test_guards.py")),
    Target(
        "ratelimit/limiter/lua/evaluate.lua",
        (
            "tests/test_oracle_window.py",
            "tests/test_limiter.py",
            "tests/test_window_properties.py::test_lua_script_and_python_reference_agree",
            "tests/test_window_properties.py::test_the_largest_request_the_caps_allow_agrees_with_the_reference",
        ),
        # The script runs only on Redis: the in-memory cases cannot kill its mutants.
        ("-k", "not memory", *_LIMITER_FAST),
    ),
)


@dataclasses.dataclass(frozen=True)
class Mutant:
    target: Target
    ident: str  # "<path>:<line>:<col> <what>", stable while the line does not move
    line: str  # the original source line, for the report
    source: str  # the whole mutated file


# --- Python mutants: AST operators -------------------------------------------------------

_COMPARE = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
    ast.In: ast.NotIn, ast.NotIn: ast.In,
}  # fmt: skip
_BINARY = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.FloorDiv: ast.Mult,
    ast.Div: ast.Mult, ast.Mod: ast.FloorDiv,
}  # fmt: skip
_SYMBOL = {
    ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
    ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in", ast.Add: "+",
    ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//", ast.Div: "/", ast.Mod: "%",
    ast.And: "and", ast.Or: "or",
}  # fmt: skip
_SWAPPED_CALLS = {"min": "max", "max": "min", "any": "all", "all": "any"}

# One mutation of one node: (description, function applying it to that node in a fresh tree).
Mutation = tuple[str, Callable[[ast.AST], None]]


def _set_op(field: str, replacement: type[ast.AST], index: int | None = None) -> Callable[[ast.AST], None]:
    def apply(node: ast.AST) -> None:
        if index is None:
            setattr(node, field, replacement())
        else:
            getattr(node, field)[index] = replacement()

    return apply


def _set_attribute(field: str, value: object) -> Callable[[ast.AST], None]:
    return lambda node: setattr(node, field, value)


def _mutations(node: ast.AST) -> Iterator[Mutation]:
    if isinstance(node, ast.Compare):
        for index, op in enumerate(node.ops):
            if type(op) in _COMPARE:
                new = _COMPARE[type(op)]
                yield f"{_SYMBOL[type(op)]} -> {_SYMBOL[new]}", _set_op("ops", new, index)
    elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _BINARY:
        new = _BINARY[type(node.op)]
        yield f"{_SYMBOL[type(node.op)]} -> {_SYMBOL[new]}", _set_op("op", new)
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        yield f"{_SYMBOL[type(node.op)]} -> {_SYMBOL[new]}", _set_op("op", new)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        yield ("not x -> x" if isinstance(node.op, ast.Not) else "-x -> x"), _set_attribute("op", ast.UAdd())
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        yield f"{node.value} -> {not node.value}", _set_attribute("value", not node.value)
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
        yield f"{node.value!r} -> {node.value + 1!r}", _set_attribute("value", node.value + 1)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _SWAPPED_CALLS:
        new_name = _SWAPPED_CALLS[node.func.id]
        yield f"{node.func.id}() -> {new_name}()", lambda call: setattr(call.func, "id", new_name)  # type: ignore[attr-defined]


def _statement_mutations(node: ast.stmt) -> Iterator[tuple[str, Callable[[ast.stmt], ast.stmt]]]:
    """Whole statements dropped: a call for its effect, a deletion, an increment, a break."""
    dropped = ast.Pass()
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        yield "call statement removed", lambda _node: dropped
    elif isinstance(node, (ast.Delete, ast.AugAssign)):
        yield f"{type(node).__name__.lower()} statement removed", lambda _node: dropped
    elif isinstance(node, ast.Break):
        yield "break -> continue", lambda _node: ast.Continue()


def _skipped_children(node: ast.AST) -> set[str]:
    """Fields that hold no decision: annotations, decorators, docstrings, messages."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return {"returns", "decorator_list"}
    if isinstance(node, ast.ClassDef):
        return {"decorator_list", "bases", "keywords"}
    if isinstance(node, ast.AnnAssign):
        return {"annotation"}
    if isinstance(node, ast.arg):
        return {"annotation"}
    if isinstance(node, ast.arguments):
        # Defaults: the composition root passes every value explicitly (settings decide them).
        return {"defaults", "kw_defaults"}
    return set()


def _is_message(node: ast.AST) -> bool:
    # Log calls, f-strings and raise arguments carry text for people, not decisions.
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        owner = node.func.value
        return isinstance(owner, ast.Name) and owner.id in {"log", "logging", "logger"}
    return False


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """Nodes that may be mutated, in a deterministic order (the same for a re-parsed tree)."""
    yield node
    skipped = _skipped_children(node)
    body = getattr(node, "body", None)
    for field, value in ast.iter_fields(node):
        if field in skipped:
            continue
        children = value if isinstance(value, list) else [value]
        for position, child in enumerate(children):
            if not isinstance(child, ast.AST) or _is_message(child):
                continue
            if field == "body" and position == 0 and value is body and _is_docstring(child):
                continue
            if isinstance(child, ast.Raise) or (isinstance(child, ast.Assign) and _is_slots(child)):
                continue
            yield from _walk(child)


def _is_docstring(node: ast.AST) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _is_slots(node: ast.Assign) -> bool:
    return any(isinstance(target, ast.Name) and target.id == "__slots__" for target in node.targets)


def python_mutants(target: Target) -> Iterator[Mutant]:
    original = (ROOT / target.path).read_text()
    lines = original.splitlines()
    tree = ast.parse(original)
    for position, node in enumerate(_walk(tree)):
        where = f"{target.path}:{getattr(node, 'lineno', 0)}:{getattr(node, 'col_offset', 0)}"
        line = lines[node.lineno - 1].strip() if hasattr(node, "lineno") else ""
        for which, (what, _apply) in enumerate(_mutations(node)):
            mutated = copy.deepcopy(tree)
            victim = list(_walk(mutated))[position]
            list(_mutations(victim))[which][1](victim)
            yield Mutant(target, f"{where} {what}", line, ast.unparse(mutated))
        for field in ("body", "orelse", "finalbody"):
            statements = getattr(node, field, None)
            if not isinstance(statements, list):
                continue
            for index, statement in enumerate(statements):
                if not isinstance(statement, ast.stmt) or _is_docstring(statement) or _is_message(statement):
                    continue
                if isinstance(statement, ast.Expr) and _is_message(statement.value):
                    continue
                for which, (what, _replace) in enumerate(_statement_mutations(statement)):
                    mutated = copy.deepcopy(tree)
                    owner = list(_walk(mutated))[position]
                    owned = getattr(owner, field)
                    owned[index] = list(_statement_mutations(owned[index]))[which][1](owned[index])
                    ident = f"{target.path}:{statement.lineno}:{statement.col_offset} {what}"
                    yield Mutant(target, ident, lines[statement.lineno - 1].strip(), ast.unparse(mutated))


# --- Lua mutants: a list of textual changes ------------------------------------------------


def lua_mutants(target: Target) -> Iterator[Mutant]:
    """One mutant per line of lua_mutations.txt: `original => replacement`, where `original`
    occurs exactly once in the script (so each entry says exactly what it changes)."""
    source = (ROOT / target.path).read_text()
    for number, entry in enumerate(LUA_MUTATIONS_FILE.read_text().splitlines(), start=1):
        if not entry.strip() or entry.lstrip().startswith("#"):
            continue
        original, _, replacement = entry.partition(" => ")
        occurrences = source.count(original)
        if occurrences != 1:
            raise SystemExit(f"{LUA_MUTATIONS_FILE.name}:{number}: {original!r} occurs {occurrences} times")
        line_number = source[: source.index(original)].count("\n") + 1
        line = source.splitlines()[line_number - 1].strip()
        mutated = source.replace(original, replacement)
        yield Mutant(target, f"{target.path}:{line_number} {original.strip()} => {replacement.strip()}", line, mutated)


def mutants_of(target: Target) -> list[Mutant]:
    mutants = list(lua_mutants(target) if target.path.endswith(".lua") else python_mutants(target))
    # Nested operators can start at one column ("16 * 1024 * 1024"): number the repeats.
    seen: dict[str, int] = {}
    unique = []
    for mutant in mutants:
        seen[mutant.ident] = seen.get(mutant.ident, 0) + 1
        repeat = seen[mutant.ident]
        unique.append(mutant if repeat == 1 else dataclasses.replace(mutant, ident=f"{mutant.ident} #{repeat}"))
    return unique


# --- Running ---------------------------------------------------------------------------------


def read_equivalents() -> dict[str, str]:
    """Mutant id -> why no test can kill it."""
    equivalents = {}
    for entry in EQUIVALENT_FILE.read_text().splitlines():
        if entry.strip() and not entry.startswith("#"):
            ident, _, reason = entry.partition(" | ")
            equivalents[ident.strip()] = reason.strip()
    return equivalents


def copy_tree(destination: Path) -> None:
    """The tree as it is now (tracked and new files), so the run sees one consistent state."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def _pytest_args(target: Target, tree: Path) -> list[str]:
    # Test files missing from the tree (a selection written ahead of its tests) are left out.
    return [test for test in target.tests if (tree / test.split("::")[0]).exists()] + list(target.options)


def run_tests(target: Target, tree: Path, timeout_s: float) -> tuple[str, float]:
    """'passed', 'failed' or 'timeout', and the seconds it took; pytest's output in tree/pytest.log."""
    environment = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "PYTHONDONTWRITEBYTECODE": "1",
        "RATELIMIT_CONFORMANCE_DIR": os.environ.get(
            "RATELIMIT_CONFORMANCE_DIR", str(ROOT.parent / "shared" / "conformance" / "envoy-ratelimit")
        ),
    }
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *_pytest_args(target, tree)]
    started = time.monotonic()
    log = (tree / "pytest.log").open("wb")
    # Own process group: a timed-out run is stopped with its redis-server and replicas.
    process = subprocess.Popen(
        command, cwd=tree, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return "timeout", time.monotonic() - started
    finally:
        log.close()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return ("passed" if code == 0 else "failed"), time.monotonic() - started


class Workspace:
    """One private copy of the tree per worker; a mutant is written in and put back after."""

    def __init__(self, root: Path) -> None:
        self.root = root
        copy_tree(root)

    def run(self, mutant: Mutant, timeout_s: float) -> tuple[str, str]:
        """The outcome, and what killed the mutant (the first failing test), if it died."""
        path = self.root / mutant.target.path
        original = path.read_text()
        path.write_text(mutant.source)
        try:
            outcome, _seconds = run_tests(mutant.target, self.root, timeout_s)
        finally:
            path.write_text(original)
        if outcome != "failed":
            return outcome, outcome
        summary = (self.root / "pytest.log").read_text(errors="replace").splitlines()
        return outcome, next((line for line in summary if line.startswith(("FAILED", "ERROR"))), "failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/mutate", description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", help="only this target path (repeatable)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    parser.add_argument("--max-minutes", type=float, default=40.0, help="stop starting mutants after this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--check-equivalents", action="store_true", help="run the listed equivalents too")
    parser.add_argument("-v", "--verbose", action="store_true", help="say which test killed each mutant")
    options = parser.parse_args(argv)

    targets = [t for t in TARGETS if not options.module or t.path in options.module]
    equivalents = read_equivalents()
    planned = {target.path: mutants_of(target) for target in targets}
    if options.list:
        for mutants in planned.values():
            for mutant in mutants:
                print(f"{mutant.ident}    [{mutant.line}]")
        return 0
    known = {mutant.ident for mutants in planned.values() for mutant in mutants}
    for stale in sorted(set(equivalents) - known):
        if any(stale.startswith(t.path) for t in targets):
            print(f"warning: {EQUIVALENT_FILE.name} lists a mutant that no longer exists: {stale}")

    scratch = Path(tempfile.mkdtemp(prefix="ratelimit-mutate-"))
    try:
        workspaces = [Workspace(scratch / str(index)) for index in range(max(1, options.jobs))]
        return _run_all(targets, planned, equivalents, workspaces, options)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_all(
    targets: list[Target],
    planned: dict[str, list[Mutant]],
    equivalents: dict[str, str],
    workspaces: list[Workspace],
    options: argparse.Namespace,
) -> int:
    deadline = time.monotonic() + options.max_minutes * 60
    timeouts: dict[str, float] = {}
    for target in targets:
        outcome, seconds = run_tests(target, workspaces[0].root, timeout_s=600)
        if outcome != "passed":
            log = (workspaces[0].root / "pytest.log").read_text(errors="replace")
            print(f"{log[-3000:]}\n{target.path}: its tests fail without any mutant; fix them first")
            return 2
        # A mutant that makes the tests hang is killed by this; three times the clean run
        # leaves room for a loaded machine.
        timeouts[target.path] = 3 * seconds + 10
        print(f"{target.path}: {len(planned[target.path])} mutants, clean run {seconds:.1f} s", flush=True)

    queue = [
        mutant
        for target in targets
        for mutant in planned[target.path]
        if options.check_equivalents or mutant.ident not in equivalents
    ]
    free = list(workspaces)
    results: dict[str, dict[str, int]] = {t.path: {"killed": 0, "survived": 0, "not run": 0} for t in targets}

    def work(mutant: Mutant) -> tuple[Mutant, str]:
        if time.monotonic() > deadline:
            return mutant, "not run"
        workspace = free.pop()
        try:
            outcome, cause = workspace.run(mutant, timeouts[mutant.target.path])
        finally:
            free.append(workspace)
        if options.verbose and outcome != "passed":
            print(f"killed {mutant.ident}: {cause}", flush=True)
        return mutant, "survived" if outcome == "passed" else "killed"

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(workspaces)) as pool:
        for mutant, verdict in pool.map(work, queue):
            if mutant.ident in equivalents:
                if verdict == "killed":
                    print(f"KILLED, though listed as equivalent (remove it): {mutant.ident}", flush=True)
                continue
            results[mutant.target.path][verdict] += 1
            if verdict == "survived":
                print(f"SURVIVED {mutant.ident}\n    {mutant.line}", flush=True)

    return _report(targets, planned, equivalents, results)


def _report(
    targets: list[Target],
    planned: dict[str, list[Mutant]],
    equivalents: dict[str, str],
    results: dict[str, dict[str, int]],
) -> int:
    print("\nper module: killed / scored (listed equivalent, not run in time)")
    for target in targets:
        counts = results[target.path]
        scored = counts["killed"] + counts["survived"] + counts["not run"]
        listed = sum(1 for mutant in planned[target.path] if mutant.ident in equivalents)
        share = counts["killed"] / scored if scored else 1.0
        print(
            f"  {target.path}: {counts['killed']}/{scored} ({share:.1%})"
            f" ({listed} equivalent, {counts['not run']} not run)"
        )
    killed = sum(counts["killed"] for counts in results.values())
    scored = sum(sum(counts.values()) for counts in results.values())
    share = killed / scored if scored else 1.0
    print(f"mutants: {killed} killed of {scored} ({share:.1%})")
    return 0 if share >= PASS_MARK else 1
