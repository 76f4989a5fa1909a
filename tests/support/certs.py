"""Throwaway certificates for TLS tests, made with the openssl command."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    ca_key: Path

    def issue(self, directory: Path, name: str, *, server: bool) -> tuple[Path, Path]:
        key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
        extensions = directory / f"{name}.ext"
        if server:
            extensions.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        else:
            extensions.write_text("extendedKeyUsage=clientAuth\n")
        _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
        _openssl(
            "x509", "-req", "-in", csr, "-CA", self.ca_cert, "-CAkey", self.ca_key, "-CAcreateserial",
            "-out", cert, "-days", "2", "-extfile", extensions,
        )  # fmt: skip
        return cert, key


def make_ca(directory: Path, name: str = "test-ca") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
        "-days", "2", "-subj", f"/CN={name}",
    )  # fmt: skip
    return Pki(cert, key)


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)
