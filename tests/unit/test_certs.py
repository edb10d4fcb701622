"""`shoal.certs` and `shoal certs`: files, X.509 contents, and a real gRPC mTLS handshake."""

from __future__ import annotations

import ipaddress
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from shoal import certs
from shoal.cli.certs import app
from shoal.config import ClientSettings
from shoal.errors import AlreadyExists, InvalidArgument, NotFound

TIMEOUT = 5.0  # seconds; every RPC has one so a broken handshake cannot hang the test
# A test-only service: a generic handler on raw bytes that answers with the caller's CN.
WHO_METHOD = "/shoal.test.Peer/Who"
# How a refused handshake surfaces depends on which side and TLS version notice it.
REFUSED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED}
_E = TypeVar("_E", bound=x509.ExtensionType)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def ext(cert: x509.Certificate, kind: type[_E]) -> _E:
    return cert.extensions.get_extension_for_class(kind).value


# --- files and X.509 contents -------------------------------------------------------------


def test_init_writes_ca_with_private_key_and_directory(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    cert_path = certs.init_ca(directory, name="Test CA")

    assert cert_path == directory / "ca.pem"
    assert mode(directory) == 0o700
    assert mode(directory / "ca.key") == 0o600
    ca = load(cert_path)
    assert certs.common_name(cert_path.read_bytes()) == "Test CA"
    assert ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)
    constraints = ext(ca, x509.BasicConstraints)
    assert constraints.ca and constraints.path_length == 0
    assert ext(ca, x509.KeyUsage).key_cert_sign
    public_key = ca.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    assert ca.not_valid_after_utc - ca.not_valid_before_utc >= timedelta(days=3650)


def test_init_twice_needs_force(tmp_path: Path) -> None:
    first = certs.init_ca(tmp_path).read_bytes()
    with pytest.raises(AlreadyExists, match="exists already"):
        certs.init_ca(tmp_path)
    assert (tmp_path / "ca.pem").read_bytes() == first

    certs.init_ca(tmp_path, force=True)
    assert (tmp_path / "ca.pem").read_bytes() != first
    assert mode(tmp_path / "ca.key") == 0o600
    assert not list(tmp_path.glob(".*.tmp"))


def test_issue_server_certificate(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    cert_path, key_path = certs.issue(tmp_path, "coordinator", hosts=["localhost", "127.0.0.1"])

    assert (cert_path, key_path) == (tmp_path / "coordinator.pem", tmp_path / "coordinator.key")
    assert mode(key_path) == 0o600
    cert, ca = load(cert_path), load(tmp_path / "ca.pem")
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "coordinator"
    assert certs.common_name(cert_path.read_bytes()) == "coordinator"
    san = ext(cert, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["shoal:coordinator"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert set(ext(cert, x509.ExtendedKeyUsage)) == {
        ExtendedKeyUsageOID.CLIENT_AUTH,
        ExtendedKeyUsageOID.SERVER_AUTH,
    }
    assert not ext(cert, x509.BasicConstraints).ca
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= timedelta(days=365)


def test_issue_client_certificate_is_client_auth_only(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    cert_path, _ = certs.issue(tmp_path, "node-1", days=7)

    cert = load(cert_path)
    cert.verify_directly_issued_by(load(tmp_path / "ca.pem"))
    assert list(ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert list(ext(cert, x509.SubjectAlternativeName)) == [
        x509.UniformResourceIdentifier("shoal:node-1")
    ]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=7)


def test_issue_ipv6_and_duplicate_hosts(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    cert_path, _ = certs.issue(tmp_path, "srv", hosts=["[::1]", "::1", "Example.COM", "*.x.io"])

    san = ext(load(cert_path), x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]
    assert san.get_values_for_type(x509.DNSName) == ["example.com", "*.x.io"]


def test_issue_replaces_an_earlier_pair(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    _, key_path = certs.issue(tmp_path, "node-1")
    first = key_path.read_bytes()
    key_path.chmod(0o644)  # a replaced key must not inherit the old file's mode

    certs.issue(tmp_path, "node-1")
    assert key_path.read_bytes() != first
    assert mode(key_path) == 0o600


@pytest.mark.parametrize(
    "name", ["", "a/b", "../x", "x y", "é", "a" * 65, ".", "..", "ca", "name\n"]
)
def test_invalid_names_are_refused(tmp_path: Path, name: str) -> None:
    certs.init_ca(tmp_path)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(InvalidArgument):
        certs.issue(tmp_path, name)
    with pytest.raises(InvalidArgument):
        certs.self_signed(tmp_path, name)
    assert sorted(tmp_path.iterdir()) == before


def test_longest_name_is_accepted(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    name = "A-z_0." + "x" * 58
    cert_path, _ = certs.issue(tmp_path, name)
    assert certs.common_name(cert_path.read_bytes()) == name


@pytest.mark.parametrize("host", ["", "bad host", "-x.com", "a..b", "x" * 64 + ".com"])
def test_invalid_hosts_are_refused(tmp_path: Path, host: str) -> None:
    certs.init_ca(tmp_path)
    with pytest.raises(InvalidArgument, match="invalid host"):
        certs.issue(tmp_path, "srv", hosts=[host])


def test_invalid_validity_is_refused(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    now = datetime.now(UTC)
    with pytest.raises(InvalidArgument):
        certs.issue(tmp_path, "x", days=0)
    with pytest.raises(InvalidArgument):
        certs.issue(tmp_path, "x", not_before=now, not_after=now - timedelta(seconds=1))


def test_issue_without_ca_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="shoal certs init"):
        certs.issue(tmp_path / "missing", "node-1")
    assert not (tmp_path / "missing").exists()


def test_self_signed_is_not_from_the_ca(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    cert_path, key_path = certs.self_signed(tmp_path / "rogue", "node-1", hosts=["localhost"])

    assert mode(key_path) == 0o600
    cert = load(cert_path)
    cert.verify_directly_issued_by(cert)
    with pytest.raises(ValueError):
        cert.verify_directly_issued_by(load(tmp_path / "ca.pem"))
    assert certs.common_name(cert_path.read_bytes()) == "node-1"


def test_common_name_of_garbage_is_invalid() -> None:
    with pytest.raises(InvalidArgument):
        certs.common_name(b"not a certificate")


# --- a real gRPC mTLS handshake -----------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A CA's certificate and the (key, certificate) pairs of the parties in these tests."""

    ca: bytes
    pairs: dict[str, tuple[bytes, bytes]]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """`coordinator` and `node-1` from the CA; `expired`, `rogue` and `stranger` it refuses."""
    ours, other = tmp_path / "ours", tmp_path / "other"
    ca = certs.init_ca(ours)
    certs.init_ca(other, name="Other CA")
    past = datetime.now(UTC) - timedelta(days=2)
    paths = {
        "coordinator": certs.issue(ours, "coordinator", hosts=["localhost", "127.0.0.1"]),
        "node-1": certs.issue(ours, "node-1"),
        "expired": certs.issue(ours, "expired", not_before=past, not_after=past + timedelta(1)),
        "rogue": certs.self_signed(tmp_path / "rogue", "rogue"),
        "stranger": certs.issue(other, "stranger"),
    }
    pairs = {name: (key.read_bytes(), cert.read_bytes()) for name, (cert, key) in paths.items()}
    return Pki(ca.read_bytes(), pairs)


async def _who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """Answer with the common name of the client's certificate."""
    names: list[bytes] = context.auth_context()["x509_common_name"]
    return names[0]


@asynccontextmanager
async def mtls_server(pki: Pki, server_cert: str = "coordinator") -> AsyncIterator[int]:
    """Serve WHO_METHOD on 127.0.0.1 with client certificates required; yield the port."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    try:
        handler = grpc.unary_unary_rpc_method_handler(
            _who, request_deserializer=None, response_serializer=None
        )
        service, method = WHO_METHOD.strip("/").split("/")
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(service, {method: handler})]
        )
        creds = grpc.ssl_server_credentials(
            [pki.pairs[server_cert]], root_certificates=pki.ca, require_client_auth=True
        )
        port: int = server.add_secure_port("127.0.0.1:0", creds)
        assert port > 0
        await server.start()
        yield port
    finally:
        await server.stop(None)


async def who(pki: Pki, port: int, client: str | None, *, host: str = "127.0.0.1") -> bytes:
    """Call WHO_METHOD presenting `client`'s certificate (or none); return the answer."""
    key, chain = pki.pairs[client] if client else (None, None)
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca, private_key=key, certificate_chain=chain
    )
    channel = grpc.aio.secure_channel(f"{host}:{port}", creds)
    try:
        answer: bytes = await channel.unary_unary(WHO_METHOD)(b"", timeout=TIMEOUT)
        return answer
    finally:
        await channel.close()


async def test_mtls_round_trip_names_the_client(pki: Pki) -> None:
    async with mtls_server(pki) as port:
        assert await who(pki, port, "node-1") == b"node-1"
        # The server certificate names both addresses, so either passes the hostname check.
        assert await who(pki, port, "node-1", host="localhost") == b"node-1"
        # A server certificate carries clientAuth as well: a coordinator can be a client.
        assert await who(pki, port, "coordinator") == b"coordinator"


@pytest.mark.parametrize("client", [None, "rogue", "stranger", "expired"])
async def test_server_refuses_client(pki: Pki, client: str | None) -> None:
    async with mtls_server(pki) as port:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await who(pki, port, client)
        assert caught.value.code() in REFUSED
        # The refusal is per connection: the server still serves good clients.
        assert await who(pki, port, "node-1") == b"node-1"


async def test_client_refuses_server_without_server_auth(pki: Pki) -> None:
    """A certificate issued without hosts is client-only, so a client will not accept it."""
    async with mtls_server(pki, server_cert="node-1") as port:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await who(pki, port, "coordinator")
        assert caught.value.code() in REFUSED


# --- the CLI ------------------------------------------------------------------------------


def test_cli_init_and_issue(tmp_path: Path) -> None:
    runner = CliRunner()
    directory = tmp_path / "certs"

    result = runner.invoke(app, ["init", "--dir", str(directory)])
    assert result.exit_code == 0, result.output
    assert "ca.pem" in result.output
    assert (directory / "ca.pem").is_file() and mode(directory / "ca.key") == 0o600

    args = ["issue", "coordinator", "--host", "localhost", "--host", "127.0.0.1"]
    result = runner.invoke(app, [*args, "--dir", str(directory)])
    assert result.exit_code == 0, result.output
    assert "--require-client-cert" in result.output
    assert f"--tls-client-ca {directory / 'ca.pem'}" in result.output
    san = ext(load(directory / "coordinator.pem"), x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]

    result = runner.invoke(app, ["issue", "node-1", "--days", "30", "--dir", str(directory)])
    assert result.exit_code == 0, result.output
    assert f"shoal node --tls-ca {directory / 'ca.pem'}" in result.output
    # Client commands have no TLS flags: the hint names what they read, and they read it.
    hint = {
        name: value
        for name, _, value in (w.partition("=") for w in result.output.split())
        if name.startswith("SHOAL_TLS_")
    }
    assert hint == {
        "SHOAL_TLS_CA": str(directory / "ca.pem"),
        "SHOAL_TLS_CERT": str(directory / "node-1.pem"),
        "SHOAL_TLS_KEY": str(directory / "node-1.key"),
    }
    with pytest.MonkeyPatch.context() as env:
        for name, value in hint.items():
            env.setenv(name, value)
        settings = ClientSettings()
    assert (settings.tls_ca, settings.tls_cert, settings.tls_key) == tuple(
        Path(v) for v in hint.values()
    )
    assert mode(directory / "node-1.key") == 0o600
    cert = load(directory / "node-1.pem")
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=30)


def test_cli_errors_exit_1(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["issue", "node-1", "--dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "error:" in result.output and "shoal certs init" in result.output

    assert runner.invoke(app, ["init", "--dir", str(tmp_path)]).exit_code == 0
    result = runner.invoke(app, ["init", "--dir", str(tmp_path)])
    assert result.exit_code == 1 and "--force" in result.output
    assert runner.invoke(app, ["init", "--force", "--dir", str(tmp_path)]).exit_code == 0

    result = runner.invoke(app, ["issue", "../escape", "--dir", str(tmp_path)])
    assert result.exit_code == 1 and "invalid certificate name" in result.output


def test_cli_default_directory_is_in_the_data_dir(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"XDG_DATA_HOME": str(tmp_path)}
    assert runner.invoke(app, ["init"], env=env).exit_code == 0
    assert runner.invoke(app, ["issue", "node-1"], env=env).exit_code == 0
    directory = tmp_path / "shoal" / "certs"
    assert {p.name for p in directory.iterdir()} == {"ca.pem", "ca.key", "node-1.pem", "node-1.key"}
