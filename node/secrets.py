"""Node-side secrets: resolving a task's SecretRefs to values, and hiding those values in text.

Values come from the node's settings and reach only the task's environment; whatever the node
sends or logs on the task's behalf goes through a `Redactor` first.
"""

from __future__ import annotations

import base64
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import quote, quote_plus

from shoal.config import NodeSettings
from shoal.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from shoal.v1 import task_pb2

__all__ = [
    "MASK",
    "MIN_REDACTED_LENGTH",
    "MissingSecrets",
    "Redactor",
    "SecretStore",
    "SecretsNotGranted",
    "StreamRedactor",
    "encoded_forms",
]

_log = logging.getLogger("shoal.node.secrets")

MASK = "***"
"""What a secret value is replaced with."""

MIN_REDACTED_LENGTH = 4
"""Shorter values are not redacted: masking a 1-3 character value would replace it wherever
it happens to occur (every `a`, every `id`), mangling all output while hiding next to nothing,
since so short a value is guessable anyway."""


class MissingSecrets(FailedPrecondition):
    """Secrets a task asked for that this node does not have; `names` lists them (no values)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(
            "secrets not configured on this node: " + ", ".join(repr(n) for n in names)
        )
        self.names = names


class SecretsNotGranted(PermissionDenied):
    """Secrets this node holds that the task's tenant may not use: the task's own mistake.

    Names the secrets asked for, never their values nor the tenants they are granted to.
    """

    def __init__(self, tenant: str, names: list[str]) -> None:
        who = f"tenant {tenant!r}" if tenant else "a task without a tenant"
        super().__init__(
            f"secrets not granted to {who} on this node: " + ", ".join(repr(n) for n in names)
        )
        self.names = names


ANY_TENANT = "*"
"""In a secret's list of tenants: every task may use it."""


class SecretStore:
    """The secrets a node holds: inline values, then one file per secret in `directory`.

    `grants` names the tenants that may use each secret ("" for tasks without a tenant,
    ANY_TENANT for all); a secret it does not list is for tasks without a tenant only.
    """

    def __init__(
        self,
        inline: Mapping[str, str] | None = None,
        directory: Path | None = None,
        grants: Mapping[str, Iterable[str]] | None = None,
    ):
        self._inline = dict(inline or {})
        self._directory = directory
        self._grants = {name: frozenset(tenants) for name, tenants in (grants or {}).items()}

    @classmethod
    def from_settings(cls, settings: NodeSettings) -> SecretStore:
        """The store of a node's `secrets`, `secrets_dir` and `secret_tenants` settings."""
        return cls(settings.secrets, settings.secrets_dir, settings.secret_tenants)

    def granted(self, name: str, tenant: str) -> bool:
        """Whether a task of `tenant` ("": none) may use the secret `name`."""
        tenants = self._grants.get(name)
        if tenants is None:
            return not tenant
        return ANY_TENANT in tenants or tenant in tenants

    def resolve(self, refs: Iterable[task_pb2.SecretRef], tenant: str = "") -> dict[str, str]:
        """Environment variable -> value for `refs`, asked for by a task of `tenant`.

        Files are read on every call, so a rotated secret is picked up (this blocks: run it in
        a thread from the event loop). Raises SecretsNotGranted naming the secrets this node
        holds that `tenant` may not use, else MissingSecrets naming every secret this node
        lacks, and InvalidArgument for a variable name no environment can hold or that two
        refs set.
        """
        env: dict[str, str] = {}
        seen: set[str] = set()
        missing: list[str] = []
        denied: list[str] = []
        for ref in refs:
            var = ref.env or ref.name
            if not var or "=" in var or "\0" in var:
                raise InvalidArgument(f"secret {ref.name!r}: invalid environment variable {var!r}")
            if var in seen:
                raise InvalidArgument(f"environment variable {var!r} is set by two secrets")
            seen.add(var)
            if not self.granted(ref.name, tenant):
                # A secret held here is refused without being read; one this node lacks may be
                # on another node, granted there.
                held = ref.name in self._grants or self._holds(ref.name)
                names = denied if held else missing
                if ref.name not in names:
                    names.append(ref.name)
                continue
            value = self._lookup(ref.name)
            if value is None:
                if ref.name not in missing:
                    missing.append(ref.name)
                continue
            env[var] = value
        if denied:
            raise SecretsNotGranted(tenant, denied)
        if missing:
            raise MissingSecrets(missing)
        return env

    def _holds(self, name: str) -> bool:
        if name in self._inline:
            return True
        return (
            self._directory is not None
            and _is_plain_file_name(name)
            and (self._directory / name).is_file()
        )

    def _lookup(self, name: str) -> str | None:
        if name in self._inline:
            return self._inline[name]
        if self._directory is None or not _is_plain_file_name(name):
            return None
        try:
            text = (self._directory / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            # Names the file and the reason only: the content is what must not be shown.
            reason = err.strerror if isinstance(err, OSError) else "not UTF-8"
            _log.warning("secret=%s unreadable in %s: %s", name, self._directory, reason)
            return None
        return text.removesuffix("\n")


def _is_plain_file_name(name: str) -> bool:
    """Whether `name` names a file directly inside a directory (no traversal, no dotfile)."""
    separators = [sep for sep in ("/", os.sep, os.altsep) if sep]
    return (
        bool(name)
        and not name.startswith(".")
        and "\0" not in name
        and not any(sep in name for sep in separators)
    )


_URLSAFE = str.maketrans("+/", "-_")


def encoded_forms(value: str) -> set[str]:
    """`value` and the usual encodings of its UTF-8 bytes: base64 (standard and URL-safe),
    hex (lower and upper case) and URL encoding.

    Base64 inside a longer encoded text depends on where the value starts modulo 3 bytes: for
    each of the three alignments, the characters that only the value's bytes determine are a
    form of their own (a character shared with the bytes around the value reveals at most 4 of
    its bits, and stays).
    """
    raw = value.encode()
    forms = {value, raw.hex(), raw.hex().upper(), quote(value), quote(value, safe="")}
    forms.add(quote_plus(value, safe=""))
    whole = base64.b64encode(raw).decode()
    forms |= {
        whole,
        whole.translate(_URLSAFE),
        whole.rstrip("="),
        whole.translate(_URLSAFE).rstrip("="),
    }
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + raw).decode()
        # Character i holds bits 6i..6i+6 of the bytes; the value's are bits 8*offset onwards.
        core = encoded[-(-8 * offset // 6) : 8 * (offset + len(raw)) // 6]
        forms |= {core, core.translate(_URLSAFE)}
    return forms


class Redactor:
    """Replaces every occurrence of the given values, and of their `encoded_forms`, with
    `MASK`, longest first, in one pass over the text.

    Empty values and values shorter than MIN_REDACTED_LENGTH are ignored (see there), and so
    are encoded forms that short.
    """

    def __init__(self, values: Iterable[str] = ()) -> None:
        kept = {
            form
            for v in values
            if len(v) >= MIN_REDACTED_LENGTH
            for form in encoded_forms(v)
            if len(form) >= MIN_REDACTED_LENGTH
        }
        # Longest first: where two values match at one position, the longer one is hidden.
        self.values: tuple[str, ...] = tuple(sorted(kept, key=lambda v: (-len(v), v)))
        self.longest = len(self.values[0]) if self.values else 0
        self._pattern = re.compile("|".join(map(re.escape, self.values))) if self.values else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def redact(self, text: str) -> str:
        """`text` with every value replaced by MASK."""
        return self._pattern.sub(MASK, text) if self._pattern is not None else text

    def stream(self) -> StreamRedactor:
        """A redactor for one stream of text that arrives in chunks."""
        return StreamRedactor(self)

    def _matches(self, text: str) -> Iterable[re.Match[str]]:
        return self._pattern.finditer(text) if self._pattern is not None else ()


class StreamRedactor:
    """Redacts a stream of chunks, where a value may be split between chunks.

    `feed` returns what is final so far and holds back at most `longest - 1` trailing
    characters that could begin a value; `flush` returns the rest at the end. The
    concatenation of everything returned equals `redact` of the concatenated input.
    """

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._pending = ""

    def feed(self, chunk: str) -> str:
        """The redacted text that no later chunk can change."""
        if not self._redactor:
            return chunk
        text = self._pending + chunk
        hold = self._undecided_from(text)
        out: list[str] = []
        pos = 0
        for match in self._redactor._matches(text):
            if match.start() >= hold:
                break  # a longer value might still match here
            out += (text[pos : match.start()], MASK)
            pos = match.end()
        done = max(pos, hold)
        out.append(text[pos:done])
        self._pending = text[done:]
        return "".join(out)

    def flush(self) -> str:
        """The redacted rest, at the end of the stream."""
        rest, self._pending = self._pending, ""
        return self._redactor.redact(rest)

    def _undecided_from(self, text: str) -> int:
        """The first position whose match depends on text yet to come: where the rest of
        `text` is a proper prefix of some value. Every position before it is decided."""
        values = self._redactor.values
        for start in range(max(0, len(text) - self._redactor.longest + 1), len(text)):
            tail = text[start:]
            if any(len(v) > len(tail) and v.startswith(tail) for v in values):
                return start
        return len(text)
