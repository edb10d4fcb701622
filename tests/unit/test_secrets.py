"""Node-side secrets: the store resolves refs by name, the redactors hide values in output."""

from __future__ import annotations

import base64
import binascii
from itertools import pairwise
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.config import NodeSettings
from shoal.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from shoal.node.secrets import (
    MASK,
    MissingSecrets,
    Redactor,
    SecretsNotGranted,
    SecretStore,
    StreamRedactor,
)
from shoal.v1 import task_pb2

SECRET = "hunter2-s3cr3t"


def refs(*pairs: tuple[str, str]) -> list[task_pb2.SecretRef]:
    return [task_pb2.SecretRef(name=name, env=env) for name, env in pairs]


# -- SecretStore ---------------------------------------------------------------------------


def test_inline_secret_goes_to_its_env_or_its_name() -> None:
    store = SecretStore.from_settings(NodeSettings(secrets={"API": "a-value", "DB": "d-value"}))

    assert store.resolve(refs(("API", "API_TOKEN"), ("DB", ""))) == {
        "API_TOKEN": "a-value",
        "DB": "d-value",
    }
    assert store.resolve([]) == {}


def test_directory_secret_loses_one_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("line1\nline2\n\n")
    (tmp_path / "plain").write_text("no-newline")
    store = SecretStore.from_settings(NodeSettings(secrets_dir=tmp_path))

    assert store.resolve(refs(("token", "T"), ("plain", "P"))) == {
        "T": "line1\nline2\n",
        "P": "no-newline",
    }


def test_inline_value_wins_over_the_directory(tmp_path: Path) -> None:
    (tmp_path / "both").write_text("from-file")
    store = SecretStore({"both": "inline"}, tmp_path)

    assert store.resolve(refs(("both", "X"))) == {"X": "inline"}


def test_every_missing_secret_is_named_but_no_value(tmp_path: Path) -> None:
    store = SecretStore({"present": SECRET}, tmp_path)

    with pytest.raises(FailedPrecondition) as info:
        store.resolve(refs(("present", "P"), ("absent", "A"), ("gone", "G"), ("absent", "B")))

    assert isinstance(info.value, MissingSecrets)
    assert info.value.names == ["absent", "gone"]
    assert "'absent'" in info.value.message and "'gone'" in info.value.message
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("name", ["../outside", "sub/inner", ".hidden", "..", ".", "", "a\0b"])
def test_directory_refuses_names_that_leave_it_or_are_hidden(tmp_path: Path, name: str) -> None:
    secrets_dir = tmp_path / "secrets"
    (secrets_dir / "sub").mkdir(parents=True)
    (secrets_dir / "sub" / "inner").write_text("nested")
    (secrets_dir / ".hidden").write_text("dotfile")
    (tmp_path / "outside").write_text("outside")
    store = SecretStore(directory=secrets_dir)

    with pytest.raises(MissingSecrets) as info:
        store.resolve(refs((name, "VAR")))

    assert info.value.names == [name]


def test_unreadable_entry_is_missing(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    (tmp_path / "binary").write_bytes(b"\xff\xfe")
    store = SecretStore(directory=tmp_path)

    with pytest.raises(MissingSecrets) as info:
        store.resolve(refs(("adir", "A"), ("binary", "B")))

    assert info.value.names == ["adir", "binary"]


def test_rotated_file_is_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "rotating"
    path.write_text("first-value\n")
    store = SecretStore(directory=tmp_path)
    assert store.resolve(refs(("rotating", "R"))) == {"R": "first-value"}

    path.write_text("second-value\n")
    assert store.resolve(refs(("rotating", "R"))) == {"R": "second-value"}

    path.unlink()
    with pytest.raises(MissingSecrets):
        store.resolve(refs(("rotating", "R")))


@pytest.mark.parametrize(
    "bad",
    [
        refs(("s", "A=B")),
        refs(("", "")),
        refs(("s", "X"), ("t", "X")),
        refs(("absent", "X"), ("s", "X")),
        refs(("s", "A\0")),
    ],
)
def test_unusable_env_names_are_the_tasks_fault(bad: list[task_pb2.SecretRef]) -> None:
    store = SecretStore({"s": "value-s", "t": "value-t"})

    with pytest.raises(InvalidArgument):
        store.resolve(bad)


def test_a_secret_is_for_the_tenants_it_is_granted_to(tmp_path: Path) -> None:
    (tmp_path / "FILED").write_text("filed-value")
    settings = NodeSettings(
        secrets={"ACME": "acme-value", "SHARED": "shared-value", "PLAIN": "plain-value"},
        secrets_dir=tmp_path,
        secret_tenants={"ACME": ["acme"], "SHARED": ["*"], "FILED": ["acme", ""]},
    )
    store = SecretStore.from_settings(settings)

    assert store.resolve(refs(("ACME", ""), ("SHARED", ""), ("FILED", "")), "acme") == {
        "ACME": "acme-value",
        "SHARED": "shared-value",
        "FILED": "filed-value",
    }
    # Not listed: for tasks without a tenant only.
    assert store.resolve(refs(("PLAIN", ""), ("SHARED", ""), ("FILED", ""))) == {
        "PLAIN": "plain-value",
        "SHARED": "shared-value",
        "FILED": "filed-value",
    }


def test_a_secret_of_another_tenant_is_refused_naming_no_value_nor_tenant(tmp_path: Path) -> None:
    (tmp_path / "GLOBEX_FILE").write_text("globex-file-value")
    store = SecretStore(
        {"GLOBEX": "globex-value", "PLAIN": "plain-value"},
        tmp_path,
        {"GLOBEX": ["globex"], "GLOBEX_FILE": ["globex", "initech"]},
    )

    for tenant in ("acme", ""):
        with pytest.raises(PermissionDenied) as info:
            store.resolve(
                refs(("GLOBEX", "A"), ("GLOBEX_FILE", "B"), ("ABSENT", "C"), ("GLOBEX", "D")),
                tenant,
            )
        assert isinstance(info.value, SecretsNotGranted)
        assert info.value.names == ["GLOBEX", "GLOBEX_FILE"]
        for hidden in ("globex-value", "globex-file-value", "'globex'", "initech"):
            assert hidden not in info.value.message
    with pytest.raises(SecretsNotGranted) as refused:
        store.resolve(refs(("PLAIN", "P")), "acme")
    assert refused.value.names == ["PLAIN"]
    assert "'acme'" in refused.value.message  # the task's own tenant
    # A secret this node lacks may be granted on another node: still missing here.
    with pytest.raises(MissingSecrets) as lacking:
        store.resolve(refs(("ABSENT", "A")), "acme")
    assert lacking.value.names == ["ABSENT"]


# -- Redactor ------------------------------------------------------------------------------


def test_common_encodings_of_a_value_are_redacted() -> None:
    redactor = Redactor([SECRET, "päss wörd/ünïcode"])

    for value in (SECRET, "päss wörd/ünïcode"):
        raw = value.encode()
        for form in (
            base64.b64encode(raw).decode(),
            base64.urlsafe_b64encode(raw).decode().rstrip("="),
            raw.hex(),
            raw.hex().upper(),
            quote(value, safe=""),
            quote(value),
            quote_plus(value),
        ):
            assert redactor.redact(f"<{form}>") == f"<{MASK}>", form


_STANDARD = str.maketrans("-_", "+/")


@pytest.mark.parametrize("before", range(4))
@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode])
def test_a_value_inside_a_longer_base64_text_is_redacted(before: int, encode: object) -> None:
    assert callable(encode)
    text = encode(b"x" * before + f'{{"token": "{SECRET}"}}'.encode() + b"tail").decode()

    redacted = Redactor([SECRET]).redact(text)

    assert MASK in redacted
    # No 4 characters left anywhere decode to 3 of the value's bytes in a row.
    for i in range(len(redacted) - 3):
        try:
            decoded = base64.b64decode(redacted[i : i + 4].translate(_STANDARD), validate=True)
        except binascii.Error:
            continue
        assert decoded not in SECRET.encode(), (i, redacted)


def test_redact_replaces_every_occurrence() -> None:
    redactor = Redactor([SECRET, "other-secret"])

    assert redactor.redact(f"a {SECRET} b {SECRET}{SECRET} other-secret.") == (
        f"a {MASK} b {MASK}{MASK} {MASK}."
    )
    assert redactor.redact("nothing here") == "nothing here"


def test_longest_value_wins_where_two_match() -> None:
    redactor = Redactor(["abcd", "abcdefgh"])

    assert redactor.redact("xabcdefghx abcdx") == f"x{MASK}x {MASK}x"


def test_empty_and_short_values_are_not_redacted() -> None:
    redactor = Redactor(["", "a", "ab", "abc"])

    assert not redactor
    assert redactor.redact("a cab abc") == "a cab abc"
    assert Redactor(["abcd"]).redact("xabcdx") == f"x{MASK}x"


def test_values_are_literal_not_patterns() -> None:
    assert Redactor(["a.*b(c"]).redact("xa.*b(c axxb(c") == f"x{MASK} axxb(c"


# -- StreamRedactor ------------------------------------------------------------------------


def chunked(redactor: Redactor, chunks: list[str]) -> list[str]:
    """What a StreamRedactor returns for each chunk, then its flush."""
    stream = redactor.stream()
    return [stream.feed(chunk) for chunk in chunks] + [stream.flush()]


def test_secret_split_at_every_position_never_shows() -> None:
    redactor = Redactor([SECRET])
    text = f"start {SECRET} middle {SECRET[:5]} {SECRET}{SECRET} end {SECRET}"
    whole = redactor.redact(text)
    assert SECRET not in whole

    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            out = chunked(redactor, [text[:i], text[i:j], text[j:]])
            assert not any(SECRET in piece for piece in out), (i, j, out)
            assert "".join(out) == whole, (i, j, out)


def test_stream_holds_back_only_a_possible_start_of_a_value() -> None:
    stream = StreamRedactor(Redactor([SECRET]))

    assert stream.feed("plain text, ") == "plain text, "  # nothing that could begin one
    assert stream.feed(f"then {SECRET[:4]}") == "then "
    assert stream.feed("x and more") == f"{SECRET[:4]}x and more"
    assert stream.feed(SECRET[:-1]) == ""
    assert stream.feed(SECRET[-1] + "!") == f"{MASK}!"
    assert stream.feed(SECRET[: len(SECRET) - 1]) == ""
    assert stream.flush() == SECRET[:-1]


def test_stream_waits_for_a_longer_value_that_may_still_match() -> None:
    stream = Redactor(["abcd", "abcdefgh"]).stream()

    assert stream.feed("xabcdef") == "x"
    assert stream.feed("gh") == MASK
    assert stream.feed("abcdefX") == f"{MASK}efX"
    assert stream.flush() == ""


def test_stream_without_values_passes_chunks_through() -> None:
    stream = Redactor().stream()

    assert stream.feed("abc") == "abc"
    assert stream.flush() == ""


_ALPHABET = "abc*"


@given(
    values=st.lists(st.text(_ALPHABET, min_size=1, max_size=8), max_size=4),
    text=st.text(_ALPHABET, max_size=60),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=6),
)
def test_stream_equals_whole_for_any_values_and_chunking(
    values: list[str], text: str, cuts: list[int]
) -> None:
    redactor = Redactor(values)
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    chunks = [text[a:b] for a, b in pairwise(bounds)]

    out = chunked(redactor, chunks)

    assert "".join(out) == redactor.redact(text)
    held = max(len(v) for v in redactor.values) - 1 if redactor.values else 0
    stream = redactor.stream()
    for chunk in chunks:
        stream.feed(chunk)
        assert len(stream._pending) <= held
