"""Certificates for TLS tests, made by a CA of the test's own (trustme), written as PEM files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trustme

from kiteq.client import TlsOptions
from tests.e2e.broker_process import ClientTls


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    ca: Path  # signs the broker's and the client's certificates
    server_cert: Path  # for 127.0.0.1 and localhost
    server_key: Path
    client_cert: Path  # for "pay-svc"
    client_key: Path
    other_ca: Path  # trusted by nobody: signs the rogue client certificate
    rogue_cert: Path
    rogue_key: Path

    def broker_keys(self, *, mtls: bool = False) -> dict[str, object]:
        keys: dict[str, object] = {"tlsCert": str(self.server_cert), "tlsKey": str(self.server_key)}
        if mtls:
            keys["tlsClientCa"] = str(self.ca)
        return keys

    def client(self, *, cert: bool = False) -> TlsOptions:
        if cert:
            return TlsOptions(ca=self.ca, cert=self.client_cert, key=self.client_key)
        return TlsOptions(ca=self.ca)

    def admin(self, *, cert: bool = False) -> ClientTls:
        if cert:
            return ClientTls(self.ca, self.client_cert, self.client_key)
        return ClientTls(self.ca)


def make_tls_files(directory: Path) -> TlsFiles:
    directory.mkdir(parents=True, exist_ok=True)
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("pay-svc")
    rogue = other.issue_cert("pay-svc")
    files = TlsFiles(
        ca=directory / "ca.pem",
        server_cert=directory / "broker.pem",
        server_key=directory / "broker.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.pem",
        rogue_cert=directory / "rogue.pem",
        rogue_key=directory / "rogue.key",
    )
    ca.cert_pem.write_to_path(str(files.ca))
    other.cert_pem.write_to_path(str(files.other_ca))
    for cert, cert_path, key_path in (
        (server, files.server_cert, files.server_key),
        (client, files.client_cert, files.client_key),
        (rogue, files.rogue_cert, files.rogue_key),
    ):
        cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key_path))
    return files
