"""`pip install .` into a fresh virtual environment gives a working `ratelimit` command."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_into_a_fresh_venv_with_its_data_files(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "ratelimit/limiter/lua/evaluate.lua" in names
    assert "ratelimit/generated/envoy/service/ratelimit/v3/rls_pb2.py" in names
    assert "ratelimit/generated/envoy/service/ratelimit/v3/rls_pb2.pyi" in names
    assert not any(name.startswith(("tests/", "envoy/")) for name in names)

    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True, timeout=600
    )
    assert installed.returncode == 0, installed.stderr
    command = environment / "bin" / "ratelimit"
    version = subprocess.run([str(command), "--version"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("ratelimit "), version.stderr
    validated = subprocess.run(
        [str(command), "validate-config", str(PROJECT_ROOT / "tests" / "data" / "service.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert validated.returncode == 0, validated.stderr
    # the Lua script is read from the installed package, not from this checkout
    script = subprocess.run(
        [str(python), "-c", "from ratelimit.limiter.script import SCRIPT_SOURCE; print(len(SCRIPT_SOURCE))"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert script.returncode == 0 and int(script.stdout) > 1000, script.stderr
