"""TLS material for the gRPC port: loaded and checked once, at the edges' start.

Both sides read PEM files into bytes (what ``grpc.ssl_*_credentials`` take) and check
them with the standard ``ssl`` module first, so a wrong path, an unparsable file or a key
that does not belong to its certificate is a ``ConfigError`` naming the option, not a
handshake failure later. ``probe_transport`` tells whether an endpoint speaks TLS, so a
client can explain a refused connection instead of retrying it until a timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import os
import ssl
from pathlib import Path
from typing import Final

from kiteq.core.errors import ConfigError

__all__ = [
    "PeerTransport",
    "ServerTls",
    "TlsMaterial",
    "TlsMode",
    "TlsOptions",
    "load_server_tls",
    "probe_transport",
]

PemPath = str | os.PathLike[str]

# The client preface of HTTP/2: a TLS gRPC server answers it with its SETTINGS frame.
_H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_MAX_PEM_BYTES: Final = 1024 * 1024


class TlsMode(enum.StrEnum):
    """What the broker's gRPC port requires."""

    OFF = "off"  # plaintext
    TLS = "tls"  # server certificate only
    MTLS = "mtls"  # and a client certificate signed by tlsClientCa


class PeerTransport(enum.StrEnum):
    """What ``probe_transport`` found at an address."""

    UNREACHABLE = "unreachable"  # no connection, no answer in time, or one that tells nothing
    PLAINTEXT = "plaintext"  # answered, but not with TLS
    TLS = "tls"  # TLS handshake done, then HTTP/2 answered
    TLS_CLIENT_CERT = "tls-client-cert"  # TLS handshake done, then closed: wants a certificate


@dataclasses.dataclass(frozen=True, slots=True)
class TlsMaterial:
    """PEM bytes for ``grpc.ssl_channel_credentials`` (None: not given)."""

    ca: bytes | None
    cert: bytes | None
    key: bytes | None
    server_name: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class TlsOptions:
    """TLS for a client's connections to brokers.

    Attributes:
        ca: PEM file of the CA certificates the brokers' certificates are checked against;
            None uses the system's trusted roots.
        cert: PEM file of this client's certificate (chain), for brokers that verify
            clients (``tlsClientCa``, mTLS); needs ``key``.
        key: PEM file of the private key of ``cert``.
        server_name: The name the brokers' certificates must carry when it is not the host
            dialled (brokers found in ZooKeeper are dialled at their advertised address,
            usually an IP address).

    Examples:
        >>> tls = TlsOptions(ca="/etc/kiteq/ca.pem")
        >>> mtls = TlsOptions(ca="/etc/kiteq/ca.pem", cert="/etc/kiteq/pay-svc.pem",
        ...                   key="/etc/kiteq/pay-svc.key")
    """

    ca: PemPath | None = None
    cert: PemPath | None = None
    key: PemPath | None = None
    server_name: str | None = None

    def load(self, prefix: str = "tls") -> TlsMaterial:
        """Read and check the files; *prefix* names the option in errors.

        Raises:
            ConfigError: A file is missing or invalid, ``cert`` and ``key`` are not given
                together or do not belong together.
        """
        if (self.cert is None) != (self.key is None):
            raise ConfigError(f"{prefix}: give cert and key together (client certificate)")
        if self.server_name is not None and not self.server_name:
            raise ConfigError(f"{prefix}.server_name: expected a non-empty host name")
        ca = _read_pem(self.ca, f"{prefix}.ca") if self.ca is not None else None
        if ca is not None:
            _check_ca(ca, f"{prefix}.ca")
        cert = key = None
        if self.cert is not None and self.key is not None:
            cert = _read_pem(self.cert, f"{prefix}.cert")
            key = _read_pem(self.key, f"{prefix}.key")
            _check_pair(self.cert, self.key, f"{prefix}.cert", f"{prefix}.key")
        return TlsMaterial(ca=ca, cert=cert, key=key, server_name=self.server_name)


@dataclasses.dataclass(frozen=True, slots=True)
class ServerTls:
    """The broker's certificate and key, and the CA clients must be signed by (mTLS)."""

    cert: bytes
    key: bytes
    client_ca: bytes | None

    @property
    def mode(self) -> TlsMode:
        return TlsMode.MTLS if self.client_ca is not None else TlsMode.TLS


def load_server_tls(cert: str, key: str, client_ca: str, *, prefix: str) -> ServerTls | None:
    """The broker's TLS material from ``tlsCert``/``tlsKey``/``tlsClientCa``; None: plaintext.

    Raises:
        ConfigError: Names the key: a file is missing or invalid, the key does not belong
            to the certificate, or ``tlsKey``/``tlsClientCa`` is set without ``tlsCert``.
    """
    if not cert and not key and not client_ca:
        return None
    if not cert or not key:
        missing = "tlsCert" if not cert else "tlsKey"
        raise ConfigError(f"{prefix}.{missing}: TLS needs both tlsCert and tlsKey")
    cert_pem = _read_pem(cert, f"{prefix}.tlsCert")
    key_pem = _read_pem(key, f"{prefix}.tlsKey")
    _check_pair(cert, key, f"{prefix}.tlsCert", f"{prefix}.tlsKey")
    ca_pem = None
    if client_ca:
        ca_pem = _read_pem(client_ca, f"{prefix}.tlsClientCa")
        _check_ca(ca_pem, f"{prefix}.tlsClientCa")
    return ServerTls(cert=cert_pem, key=key_pem, client_ca=ca_pem)


def _read_pem(path: PemPath, name: str) -> bytes:
    try:
        with Path(path).open("rb") as fh:
            data = fh.read(_MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {os.fspath(path)!r}: {exc.strerror}") from exc
    if len(data) > _MAX_PEM_BYTES or b"-----BEGIN " not in data:
        raise ConfigError(f"{name}: {os.fspath(path)!r} is not a PEM file")
    return data


def _check_ca(pem: bytes, name: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=pem.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{name}: no valid CA certificate in the file: {exc}") from exc


def _check_pair(cert: PemPath, key: PemPath, cert_name: str, key_name: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{cert_name}/{key_name}: not a certificate and its private key: {exc.reason or exc}"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"{cert_name}/{key_name}: {exc}") from exc


async def probe_transport(
    address: str, timeout: float, *, client_cert: tuple[PemPath, PemPath] | None = None
) -> PeerTransport:
    """Connect to *address* (``host:port``) and find out whether it speaks TLS.

    The handshake does not verify the peer: the answer only explains a refused connection,
    nothing is sent over it but the HTTP/2 preface. With *client_cert* (certificate and
    key files) the probe presents it, so ``TLS`` then means the broker accepts it.
    """
    host, _, port = address.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a probe: nothing is trusted or sent
    context.set_alpn_protocols(["h2"])
    if client_cert is not None:
        context.load_cert_chain(*client_cert)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            try:
                reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
            except (OSError, ValueError):
                return PeerTransport.UNREACHABLE
            try:
                await writer.start_tls(context)
            except ssl.SSLError as exc:
                # a record that is not TLS is plaintext; an alert from the server is TLS
                # (TLS 1.2 refuses a missing client certificate in the handshake)
                reason = str(exc).upper()
                if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
                    return PeerTransport.PLAINTEXT
                if "ALERT" in reason:
                    return PeerTransport.TLS_CLIENT_CERT
                return PeerTransport.UNREACHABLE  # closed mid-handshake: tells nothing
            except ConnectionError:
                return PeerTransport.UNREACHABLE
            writer.write(_H2_PREFACE)
            try:
                answer = await reader.read(1)
            except (ssl.SSLError, ConnectionError):
                return PeerTransport.TLS_CLIENT_CERT
            # TLS 1.3: the server checks the client's certificate after the handshake
            # completed on this side, and closes the connection when there is none
            return PeerTransport.TLS if answer else PeerTransport.TLS_CLIENT_CERT
    except TimeoutError:
        return PeerTransport.UNREACHABLE
    finally:
        if writer is not None:
            writer.transport.abort()  # nothing to flush: a probe ends without a goodbye
