"""A private CA and the certificates it signs, for TLS and mTLS between Shoal processes.

Keys are EC P-256 and signatures SHA-256. A directory holds `ca.pem` and `ca.key` and one
`<name>.pem` / `<name>.key` pair per issued certificate; key files are mode 0600.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shoal.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "common_name",
    "init_ca",
    "issue",
    "self_signed",
]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# Certificates start a little in the past so a peer whose clock lags still accepts them.
_BACKDATE = timedelta(minutes=5)

_SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signatures; a CA also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def init_ca(
    directory: Path, *, name: str = "Shoal CA", days: int = 3650, force: bool = False
) -> Path:
    """Create a CA in `directory` and return the path of its certificate.

    Raises AlreadyExists when `directory` has a CA already, unless `force` (which replaces it
    and so invalidates every certificate the old CA signed).
    """
    if not name.strip():
        raise InvalidArgument("the CA name must not be empty")
    if days < 1:
        raise InvalidArgument(f"days must be at least 1, got {days}")
    cert_path = directory / CA_CERT
    if cert_path.exists() and not force:
        raise AlreadyExists(f"a CA exists already at {cert_path}; pass --force to replace it")
    _make_dir(directory)

    key = _new_key()
    subject = _subject(name)
    not_before = datetime.now(UTC) - _BACKDATE
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    # The key goes first: a crash in between leaves no ca.pem, so `init` can simply be rerun.
    _write(directory / CA_KEY, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path


def issue(
    directory: Path,
    name: str,
    *,
    hosts: Sequence[str] = (),
    days: int = 365,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[Path, Path]:
    """Sign a certificate for `name` with the CA in `directory`; return (cert, key) paths.

    The certificate is for client auth, and for server auth too when `hosts` (DNS names or IP
    addresses) are given. An earlier pair of the same name is replaced.
    """
    _check_name(name)
    sans = _sans(name, hosts)
    start, end = _validity(days, not_before, not_after)
    ca_cert, ca_key = _load_ca(directory)

    key = _new_key()
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if hosts:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        _leaf_builder(name, key, sans, usages, start, end)
        .issuer_name(ca_cert.subject)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _write_pair(directory, name, cert, key, chain=(ca_cert,))


def self_signed(directory: Path, name: str, *, hosts: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write a certificate for `name` signed by its own key; return (cert, key) paths.

    No CA trusts it: it exists to show that peers reject certificates outside the CA.
    """
    _check_name(name)
    sans = _sans(name, hosts)
    start, end = _validity(365, None, None)
    key = _new_key()
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    cert = (
        _leaf_builder(name, key, sans, usages, start, end)
        .issuer_name(_subject(name))
        .sign(key, hashes.SHA256())
    )
    _make_dir(directory)
    return _write_pair(directory, name, cert, key)


def common_name(pem: bytes) -> str:
    """The subject common name (CN) of the PEM certificate `pem`."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as err:
        raise InvalidArgument(f"not a PEM certificate: {err}") from None
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        raise InvalidArgument("the certificate has no common name")
    value = attrs[0].value
    return value.decode() if isinstance(value, bytes) else value


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name) or name in {".", ".."}:
        raise InvalidArgument(
            f"invalid certificate name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-'"
        )
    if name == Path(CA_CERT).stem:
        raise InvalidArgument(f"the name {name!r} is taken by the CA's own files")


def _sans(name: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(f"shoal:{name}")]
    for host in hosts:
        san = _host_san(host)
        if san not in sans:
            sans.append(san)
    return sans


def _host_san(host: str) -> x509.GeneralName:
    """An IPAddress entry when `host` parses as one (brackets allowed), else a DNSName."""
    bare = host.strip().removeprefix("[").removesuffix("]")
    try:
        return x509.IPAddress(ipaddress.ip_address(bare))
    except ValueError:
        pass
    dns = bare.lower().rstrip(".")
    labels = dns.removeprefix("*.").split(".")
    if len(dns) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise InvalidArgument(f"invalid host {host!r}: not an IP address or DNS name")
    return x509.DNSName(dns)


def _validity(
    days: int, not_before: datetime | None, not_after: datetime | None
) -> tuple[datetime, datetime]:
    if days < 1:
        raise InvalidArgument(f"days must be at least 1, got {days}")
    start = datetime.now(UTC) - _BACKDATE if not_before is None else not_before
    end = start + timedelta(days=days) if not_after is None else not_after
    if end <= start:
        raise InvalidArgument(f"not_after ({end}) must be later than not_before ({start})")
    return start, end


def _load_ca(directory: Path) -> tuple[x509.Certificate, _SigningKey]:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"no CA in {directory}: run `shoal certs init` first") from None
    except OSError as err:
        raise FailedPrecondition(f"cannot read the CA in {directory}: {err.strerror}") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise FailedPrecondition(f"the CA in {directory} is unreadable: {err}") from None
    if not isinstance(key, _SigningKey):
        raise FailedPrecondition(f"{key_path}: only EC and RSA CA keys are supported")
    if key.public_key() != cert.public_key():
        raise FailedPrecondition(f"{key_path} is not the key of {cert_path}")
    return cert, key


def _leaf_builder(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    sans: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
    start: datetime,
    end: datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(_subject(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _subject(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_pair(
    directory: Path,
    name: str,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    *,
    chain: Sequence[x509.Certificate] = (),
) -> tuple[Path, Path]:
    """Write `name`.key and `name`.pem: the certificate, then the `chain` that signed it (a
    server sends it all, so a node holding only the CA's fingerprint can find the CA)."""
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    _write(key_path, _key_pem(key), 0o600)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, *chain))
    _write(cert_path, pem, 0o644)
    return cert_path, key_path


def _make_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise FailedPrecondition(f"cannot create {directory}: {err.strerror}") from None


def _write(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` atomically; the file is created with `mode`, never wider."""
    # O_EXCL on a fresh name: the file is ours from the start (no symlink followed, no window
    # with wider permissions), and os.replace swaps it in whole.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise FailedPrecondition(f"cannot write {path}: {err.strerror}") from None
