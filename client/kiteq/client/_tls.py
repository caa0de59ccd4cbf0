"""How sessions reach brokers: plaintext or TLS channels, and why a TLS connection failed.

gRPC reports a plaintext client refused by a TLS port, and a TLS client without the
certificate an mTLS port requires, as ``UNAVAILABLE: Socket closed``: the same words as a
broker that is down, which a client retries until its timeout. ``Transport.explain`` turns
these into a ``TlsError`` that says what to configure, probing the port when the gRPC
message alone does not tell.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import grpc

from kiteq.core.errors import ConfigError, TlsError
from kiteq.core.tls import PeerTransport, TlsOptions, probe_transport

__all__ = ["PLAINTEXT", "Transport"]

_PROBE_TIMEOUT: Final = 2.0
# gRPC's words for a connection that never reached a TLS handshake
_NOT_TLS_RELATED: Final = ("Connection refused", "Deadline Exceeded", "Timeout", "timed out")


class Transport:
    """Opens channels to brokers, plaintext (``tls=None``) or TLS.

    Raises:
        ConfigError: A TLS file is missing or invalid (from the constructor).
    """

    def __init__(self, tls: TlsOptions | None) -> None:
        if tls is not None and not isinstance(tls, TlsOptions):
            raise ConfigError(f"tls must be a TlsOptions, got {tls!r}")
        self._tls = tls
        self._credentials: grpc.ChannelCredentials | None = None
        self._options: tuple[tuple[str, str], ...] = ()
        if tls is not None:
            material = tls.load()
            self._credentials = grpc.ssl_channel_credentials(
                material.ca, material.key, material.cert
            )
            if material.server_name:
                self._options = (("grpc.ssl_target_name_override", material.server_name),)

    @property
    def secure(self) -> bool:
        return self._tls is not None

    def channel(
        self, address: str, options: Sequence[tuple[str, int | str]] = ()
    ) -> grpc.aio.Channel:
        """A new channel to *address* (call on the loop that will use it)."""
        if self._credentials is None:
            return grpc.aio.insecure_channel(address, options=tuple(options))
        return grpc.aio.secure_channel(
            address, self._credentials, options=(*options, *self._options)
        )

    async def explain(self, address: str, error: grpc.aio.AioRpcError) -> TlsError | None:
        """The TLS reason why opening a session to *address* failed with *error*, if any."""
        if error.code() is not grpc.StatusCode.UNAVAILABLE:
            return None
        details = error.details() or ""
        lowered = details.lower()
        if "handshake" in lowered or "verification" in lowered:
            return self._handshake_error(address, details)
        if any(word in details for word in _NOT_TLS_RELATED):
            return None  # nothing listens, or nothing answered: a probe cannot tell more
        found = await probe_transport(address, _PROBE_TIMEOUT)
        if self._tls is None:
            if found in (PeerTransport.TLS, PeerTransport.TLS_CLIENT_CERT):
                return TlsError(
                    f"broker {address} serves TLS but this client connects in plaintext: "
                    "pass tls=TlsOptions(ca=...)"
                )
            return None
        if found is PeerTransport.TLS_CLIENT_CERT:
            tls = self._tls
            if tls.cert is None or tls.key is None:
                return TlsError(
                    f"broker {address} requires a client certificate (mTLS, TLS closed after "
                    "the handshake): pass TlsOptions(cert=..., key=...)"
                )
            # the same connection with this client's certificate: accepted means the
            # failure was something else (a broker going down), to be retried
            with_cert = await probe_transport(
                address, _PROBE_TIMEOUT, client_cert=(tls.cert, tls.key)
            )
            if with_cert is not PeerTransport.TLS_CLIENT_CERT:
                return None
            return TlsError(
                f"broker {address} refused this client's TLS certificate (mTLS): is it "
                "signed by a CA in the broker's tlsClientCa?"
            )
        return None

    @staticmethod
    def _handshake_error(address: str, details: str) -> TlsError:
        if "WRONG_VERSION_NUMBER" in details:
            return TlsError(
                f"broker {address} does not speak TLS (a plaintext port?) but this client "
                "has tls= set"
            )
        if "CERTIFICATE_VERIFY_FAILED" in details:
            reason = (
                details.rpartition("CERTIFICATE_VERIFY_FAILED:")[2].removesuffix(": OK").strip()
            )
            return TlsError(
                f"broker {address}: TLS certificate not trusted ({reason or 'verify failed'}): "
                "check TlsOptions.ca, or server_name when the certificate names another host"
            )
        if "hostname verification" in details.lower() or "peer name" in details.lower():
            return TlsError(
                f"broker {address}: its TLS certificate does not name the host dialled: "
                "set TlsOptions.server_name to a name it carries"
            )
        return TlsError(f"broker {address}: TLS handshake failed: {details}")


PLAINTEXT: Final = Transport(None)
