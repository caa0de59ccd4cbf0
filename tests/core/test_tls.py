"""TLS material loading (client and broker) and the transport probe, on real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from kiteq.core.errors import ConfigError
from kiteq.core.tls import PeerTransport, TlsMode, TlsOptions, load_server_tls, probe_transport
from tests._servers import free_port
from tests.e2e.tls_files import TlsFiles, make_tls_files


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def test_client_options_load_pem_bytes(files: TlsFiles) -> None:
    material = TlsOptions(
        ca=files.ca, cert=files.client_cert, key=files.client_key, server_name="localhost"
    ).load()
    assert material.ca == files.ca.read_bytes()
    assert material.cert == files.client_cert.read_bytes()
    assert material.key == files.client_key.read_bytes()
    assert material.server_name == "localhost"
    system_roots = TlsOptions().load()
    assert (system_roots.ca, system_roots.cert, system_roots.key) == (None, None, None)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (lambda f, t: TlsOptions(cert=f.client_cert), "tls: give cert and key together"),
        (lambda f, t: TlsOptions(key=f.client_key), "tls: give cert and key together"),
        (lambda f, t: TlsOptions(ca=t / "missing.pem"), "tls.ca: cannot read"),
        (lambda f, t: TlsOptions(ca=f.client_key), "tls.ca: no valid CA certificate"),
        (lambda f, t: TlsOptions(ca=t / "empty.pem"), "tls.ca: "),
        (
            lambda f, t: TlsOptions(cert=f.client_cert, key=f.server_key),
            "tls.cert/tls.key: not a certificate and its private key",
        ),
        (lambda f, t: TlsOptions(server_name=""), "tls.server_name"),
    ],
)
def test_client_options_name_what_is_wrong(
    files: TlsFiles,
    tmp_path: Path,
    options: Callable[[TlsFiles, Path], TlsOptions],
    named: str,
) -> None:
    (tmp_path / "empty.pem").write_text("")
    with pytest.raises(ConfigError) as raised:
        options(files, tmp_path).load()
    assert named in str(raised.value)


def test_server_tls_modes(files: TlsFiles) -> None:
    assert load_server_tls("", "", "", prefix="clusters.c") is None
    tls = load_server_tls(str(files.server_cert), str(files.server_key), "", prefix="clusters.c")
    assert tls is not None
    assert tls.mode is TlsMode.TLS
    assert tls.client_ca is None
    mtls = load_server_tls(
        str(files.server_cert), str(files.server_key), str(files.ca), prefix="clusters.c"
    )
    assert mtls is not None
    assert mtls.mode is TlsMode.MTLS


@pytest.mark.parametrize(
    ("cert", "key", "client_ca", "named"),
    [
        ("server_cert", "", "", "clusters.c.tlsKey: TLS needs both"),
        ("", "server_key", "", "clusters.c.tlsCert: TLS needs both"),
        ("", "", "ca", "clusters.c.tlsCert: TLS needs both"),
        ("server_cert", "client_key", "", "clusters.c.tlsCert/clusters.c.tlsKey"),
        ("server_cert", "server_key", "server_key", "clusters.c.tlsClientCa"),
        ("server_key", "server_key", "", "clusters.c.tlsCert/clusters.c.tlsKey"),
    ],
)
def test_server_tls_names_the_key(
    files: TlsFiles, cert: str, key: str, client_ca: str, named: str
) -> None:
    def path(name: str) -> str:
        return str(getattr(files, name)) if name else ""

    with pytest.raises(ConfigError) as raised:
        load_server_tls(path(cert), path(key), path(client_ca), prefix="clusters.c")
    assert named in str(raised.value)


async def serve(files: TlsFiles | None, *, mtls: bool = False) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    if files is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        credentials = grpc.ssl_server_credentials(
            [(files.server_key.read_bytes(), files.server_cert.read_bytes())],
            root_certificates=files.ca.read_bytes() if mtls else None,
            require_client_auth=mtls,
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def servers(files: TlsFiles) -> AsyncIterator[dict[str, str]]:
    started = {
        "plaintext": await serve(None),
        "tls": await serve(files),
        "mtls": await serve(files, mtls=True),
    }
    yield {name: address for name, (_, address) in started.items()}
    for server, _ in started.values():
        await server.stop(0)


async def test_probe_tells_plaintext_tls_and_mtls_apart(servers: dict[str, str]) -> None:
    assert await probe_transport(servers["plaintext"], 2.0) is PeerTransport.PLAINTEXT
    assert await probe_transport(servers["tls"], 2.0) is PeerTransport.TLS
    assert await probe_transport(servers["mtls"], 2.0) is PeerTransport.TLS_CLIENT_CERT
    assert await probe_transport(f"127.0.0.1:{free_port()}", 2.0) is PeerTransport.UNREACHABLE


async def test_probe_with_a_client_certificate(files: TlsFiles, servers: dict[str, str]) -> None:
    accepted = (files.client_cert, files.client_key)
    rogue = (files.rogue_cert, files.rogue_key)
    assert await probe_transport(servers["mtls"], 2.0, client_cert=accepted) is PeerTransport.TLS
    assert (
        await probe_transport(servers["mtls"], 2.0, client_cert=rogue)
        is PeerTransport.TLS_CLIENT_CERT
    )


async def test_a_peer_that_just_closes_is_not_taken_for_tls() -> None:
    # a broker going down may accept and close: that must stay a retriable failure
    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await probe_transport(f"127.0.0.1:{port}", 2.0) is PeerTransport.UNREACHABLE
    finally:
        server.close()
        await server.wait_closed()
