"""`serve --workers N`: N server processes on one port, one metrics endpoint for their sum.

Python's gRPC stack, not Redis, is the ceiling of one process, so a node runs several
processes that share the gRPC port through SO_REUSEPORT (the kernel spreads connections).
Workers write their metrics to prometheus_client's multiprocess files; this supervisor
serves their sum. SIGTERM and SIGINT are passed on to every worker, each drains its calls; the
supervisor exits 0 when all of them did. A worker that dies on its own takes the node
down (exit 1), so the orchestrator restarts a whole, known-good node.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType

from prometheus_client import CollectorRegistry, multiprocess

from ratelimit.app import open_metrics_exporter
from ratelimit.metrics import ProcessTreeCollector
from ratelimit.settings import Settings, settings_to_environment

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.2


def run_workers(settings: Settings) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="ratelimit-metrics-")
    environment = {
        **os.environ,
        **settings_to_environment(settings),
        "RATELIMIT_WORKERS": "1",
        "RATELIMIT_REUSE_PORT": "true",
        "RATELIMIT_METRICS_PORT": "0",
        "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
    }
    exporter = None
    workers: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        # The same signal: each worker treats SIGTERM (shutdown delay) and SIGINT (none) alike.
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        if settings.metrics_port:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=metrics_dir)
            registry.register(ProcessTreeCollector(lambda: [w.pid for w in workers if w.poll() is None]))
            exporter = open_metrics_exporter(registry, settings)
        for _ in range(settings.workers):
            workers.append(subprocess.Popen([sys.executable, "-m", "ratelimit", "serve"], env=environment))
        log.info("started %d workers on %s:%d", len(workers), settings.grpc_host, settings.grpc_port)
        while not stopping and all(worker.poll() is None for worker in workers):
            time.sleep(POLL_INTERVAL_S)
        if not stopping:
            dead = [w for w in workers if w.poll() is not None]
            log.error("worker %d exited with %s; stopping the node", dead[0].pid, dead[0].returncode)
            forward(signal.SIGTERM, None)
        codes = [worker.wait(timeout=settings.shutdown_delay_s + settings.shutdown_grace_s + 10) for worker in workers]
        return 0 if stopping and all(code == 0 for code in codes) else 1
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            multiprocess.mark_process_dead(worker.pid, metrics_dir)
        if exporter is not None:
            exporter.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)
