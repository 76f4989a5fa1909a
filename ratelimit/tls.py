"""gRPC server TLS and mTLS, with certificates reloaded when their files change.

gRPC asks for the certificate configuration on each new handshake; we answer with a new
one only when a file's (path, size, mtime) changed, so a renewed certificate (cert-manager,
a rotated Secret) is served to new connections without a restart.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None  # set: clients must present a certificate it signed

    def fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        marks = []
        for path in (self.cert_file, self.key_file, self.client_ca_file):
            if path:
                stat = os.stat(path)
                marks.append((os.path.realpath(path), stat.st_size, stat.st_mtime_ns))
        return tuple(marks)

    def certificate_configuration(self) -> grpc.ServerCertificateConfiguration:
        with open(self.key_file, "rb") as key, open(self.cert_file, "rb") as cert:
            pair = (key.read(), cert.read())
        root = None
        if self.client_ca_file:
            with open(self.client_ca_file, "rb") as ca:
                root = ca.read()
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=root)


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials that re-read the files when they change (and keep the old ones if unreadable)."""
    lock = threading.Lock()
    state = {"fingerprint": files.fingerprint()}
    initial = files.certificate_configuration()

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        with lock:
            try:
                current = files.fingerprint()
                if current == state["fingerprint"]:
                    return None
                configuration = files.certificate_configuration()
            except OSError as exc:
                log.error("TLS files unreadable, keeping the previous certificate: %s", exc)
                return None
            state["fingerprint"] = current
            log.info("TLS certificate reloaded from %s", files.cert_file)
            return configuration

    return grpc.dynamic_ssl_server_credentials(
        initial, fetch, require_client_authentication=files.client_ca_file is not None
    )
