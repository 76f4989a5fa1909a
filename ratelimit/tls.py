"""gRPC server TLS and mTLS, with certificates reloaded when their files change.

gRPC asks for the certificate configuration on each new handshake; we answer with a new
one only when a file changed (see `filemarks`), so a renewed certificate (cert-manager, a
rotated Secret) is served to new connections without a restart. A changed set of files is
checked first (the key must match the certificate, the PEM must parse): an unreadable or
invalid one is refused, the previous certificate stays in force, and `CertificateState`
says so (health `ratelimit.Tls`, metric `ratelimit_tls_certificate_healthy`) until a valid
change arrives.
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass

import grpc

from ratelimit.filemarks import FileMark, file_mark

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None  # set: clients must present a certificate it signed

    def fingerprint(self) -> tuple[FileMark, ...]:
        return tuple(file_mark(path) for path in (self.cert_file, self.key_file, self.client_ca_file) if path)

    def certificate_configuration(self) -> grpc.ServerCertificateConfiguration:
        """The files as gRPC wants them, once they are known to be a valid set (else ValueError)."""
        with open(self.key_file, "rb") as key, open(self.cert_file, "rb") as cert:
            pair = (key.read(), cert.read())
        root = None
        if self.client_ca_file:
            with open(self.client_ca_file, "rb") as ca:
                root = ca.read()
        self._check()
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=root)

    def _check(self) -> None:
        # gRPC takes any bytes here and fails each later handshake instead: check with OpenSSL now.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
            if self.client_ca_file:
                context.load_verify_locations(self.client_ca_file)
        except ssl.SSLError as exc:
            raise ValueError(
                f"invalid TLS files ({self.cert_file}, {self.key_file}"
                f"{', ' + self.client_ca_file if self.client_ca_file else ''}): {exc.reason or exc}"
            ) from exc


class CertificateState:
    """Whether the certificate files in force are the ones on disk (None) or why not."""

    def __init__(self) -> None:
        self.last_error: str | None = None


def server_credentials(files: TlsFiles, state: CertificateState | None = None) -> grpc.ServerCredentials:
    """Credentials that re-read the files when they change, and keep the old ones if the new are bad."""
    lock = threading.Lock()
    state = state if state is not None else CertificateState()
    marks = {"in_force": files.fingerprint(), "refused": ()}
    initial = files.certificate_configuration()  # invalid at start: ValueError to the CLI

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        with lock:
            current: tuple[FileMark, ...] = ()
            try:
                current = files.fingerprint()
                if current in (marks["in_force"], marks["refused"]):
                    return None
                configuration = files.certificate_configuration()
            except (OSError, ValueError) as exc:
                marks["refused"] = current  # don't check the same bad files on every handshake
                state.last_error = str(exc)
                log.error("TLS files refused, keeping the previous certificate: %s", exc)
                return None
            marks["in_force"], marks["refused"] = current, ()
            state.last_error = None
            log.info("TLS certificate reloaded from %s", files.cert_file)
            return configuration

    return grpc.dynamic_ssl_server_credentials(
        initial, fetch, require_client_authentication=files.client_ca_file is not None
    )
