"""The README's runnable examples, run as written and compared with the output it shows.

Each example is a marked block (tests/support/readme.py). The only liberty taken: the port
8081 becomes a free one, so the test never meets a service a developer runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

from tests.support.processes import free_port
from tests.support.readme import fenced, readme_block, shell_commands
from tests.support.replica import PROJECT_ROOT, wait_until_serving

# The console scripts of the environment (ratelimit, grpcurl) come first, as after `pip install .`.
SHELL_ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def run_shell(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT, env=SHELL_ENV
    )


@contextlib.contextmanager
def background(command: str, port: int) -> Iterator[subprocess.Popen[str]]:
    """`command &` as a shell runs it, until the service it starts serves on `port`."""
    process = subprocess.Popen(
        ["bash", "-c", f"exec {command.removesuffix('&').strip()}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=PROJECT_ROOT,
        env=SHELL_ENV,
        start_new_session=True,
    )
    try:
        wait_until_serving(f"127.0.0.1:{port}", process=process)  # type: ignore[arg-type]
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=20)


def seconds_to_reset_blurred(text: str) -> str:
    """`text` with the table's reset_s figure (a minute and a bucket or so: 59-62) blurred."""
    return re.sub(r"  (59|6[0-2])$", "  <about a minute>", text, flags=re.MULTILINE)


def test_trying_it_runs_as_written() -> None:
    block = readme_block("trying-it")
    port = free_port()
    on_port = lambda text: text.replace("8081", str(port))  # noqa: E731
    check_script, grpcurl_script = (on_port(script) for script in fenced(block, "sh"))
    (check_output,) = fenced(block, "")
    (call_output,) = fenced(block, "json")
    (python_example,) = fenced(block, "python")
    serve, check_loop = shell_commands(check_script)
    assert serve.endswith("&")

    with background(serve, port):
        checks = run_shell(check_loop)
        grpcurl_runs = [run_shell(command) for command in shell_commands(grpcurl_script)]
        python = subprocess.run(
            [sys.executable, "-c", on_port(python_example)], capture_output=True, text=True, timeout=30
        )

    # Three OK answers (exit status 0), then exactly the OVER_LIMIT answer shown.
    assert checks.stderr == ""
    answers = checks.stdout.split("overall: ")
    assert [answer.split("\n")[:2] for answer in answers[1:]] == [["OK", "exit status 0"]] * 3 + [
        ["OVER_LIMIT", "exit status 1"]
    ]
    last_answer = "descriptor" + checks.stdout.rsplit("descriptor", 1)[1]
    assert seconds_to_reset_blurred(last_answer) == seconds_to_reset_blurred(check_output)
    assert "<about a minute>" in seconds_to_reset_blurred(check_output)

    # grpcurl: every command works; the call and the health check answer as shown.
    assert [run.returncode for run in grpcurl_runs] == [0] * 4, [run.stderr for run in grpcurl_runs]
    listed, described, called, health = grpcurl_runs
    assert "envoy.service.ratelimit.v3.RateLimitService" in listed.stdout.split()
    assert "rpc ShouldRateLimit" in described.stdout
    assert json.loads(health.stdout) == {"status": "SERVING"}
    assert _without_reset(json.loads(called.stdout)) == _without_reset(json.loads(call_output))

    # Python: what the comment says it prints.
    assert python.returncode == 0, python.stderr
    printed = re.search(r"^\s*print\(.*\)\s+# (.+)$", python_example, flags=re.MULTILINE)
    assert printed is not None
    assert python.stdout == printed[1] + "\n"


def _without_reset(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer with each duration_until_reset checked (within a few seconds of a minute) and removed."""
    for status in answer["statuses"]:
        seconds = status.pop("duration_until_reset")
        assert re.fullmatch(r"(59|6[0-2])s", seconds), seconds
    return answer


def test_the_validate_config_example_prints_what_the_readme_shows() -> None:
    transcript = fenced(readme_block("validate-example"), "")[0]
    sessions = transcript.split("$ ")[1:]
    assert len(sessions) == 2
    for session in sessions:
        command, _, shown = session.partition("\n")
        done = run_shell(command)
        # Errors go to stderr, `ok:` to stdout: the reader sees both, in this order.
        assert done.stderr + done.stdout == shown, command
        assert done.returncode == (1 if done.stderr else 0)
