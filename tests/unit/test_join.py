"""The join line: its URL form, what it refuses, and the CA fingerprint it pins."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from shoal import certs
from shoal.errors import InvalidArgument
from shoal.join import JoinLine, ca_fingerprint

PIN = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "line",
    [
        JoinLine("coord.example:7070", "tok"),
        JoinLine("10.0.0.5:7070", "a token/with?odd=chars&more", PIN),
        JoinLine("[::1]:7070", "tok", PIN),
    ],
)
def test_a_join_line_reads_back_as_written(line: JoinLine) -> None:
    assert JoinLine.parse(line.url()) == line


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "shoal://HOST:PORT"),
        ("http://h:1?token=t", "shoal://HOST:PORT"),
        ("shoal://h?token=t", "shoal://HOST:PORT"),
        ("shoal://h:99999?token=t", "not a join line"),
        ("shoal://h:1", "no token"),
        ("shoal://h:1?token=", "no token"),
        ("shoal://h:1?token=t&token=u", "given once"),
        ("shoal://h:1?token=t&admin=1", "unknown join line fields: admin"),
        ("shoal://h:1?token=t&ca=md5:00", "ca is sha256:"),
        ("shoal://h:1?token=t&ca=sha256:" + "AB" * 32, "ca is sha256:"),
        ("shoal://h:1/path?token=t", "only HOST:PORT"),
        ("shoal://user:pw@h:1?token=t", "only HOST:PORT"),
        ("shoal://h:1?token", "NAME=VALUE"),
        ("shoal://h:1?token=" + "t" * 5000, "at most 4096"),
    ],
)
def test_anything_else_is_refused_with_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(InvalidArgument, match=None) as refused:
        JoinLine.parse(text)
    assert says in refused.value.message


def test_the_ca_fingerprint_is_the_sha256_of_its_der(tmp_path: Path) -> None:
    pem = certs.init_ca(tmp_path / "ca").read_bytes()
    der_sha256 = x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()
    assert ca_fingerprint(pem) == f"sha256:{der_sha256}"
    with pytest.raises(InvalidArgument, match="not a PEM certificate"):
        ca_fingerprint(b"not a certificate")
