"""API tokens: hashed at rest, constant-time checked, expiring, revocable, bootstrapped."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from shoal.auth import Principal, Role, parse_token
from shoal.coordinator.store import SqliteStore
from shoal.coordinator.tokens import TokenRegistry
from shoal.coordinator.validation import check_hello
from shoal.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from shoal.handshake import Direction
from shoal.v1 import node_pb2
from shoal.validation import Limits


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _files_of(directory: Path, pattern: str) -> bytes:
    return b"".join(p.read_bytes() for p in directory.glob(pattern))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "s.db")
    await s.open()
    yield s
    await s.close()


async def test_a_token_authenticates_as_its_principal_and_only_its_hash_is_stored(
    store: SqliteStore, tmp_path: Path
) -> None:
    registry = TokenRegistry(store)
    made = await registry.create(
        name="edge", role=Role.NODE, created_by="root", executors=["shell"], labels={"z": "a"}
    )
    principal = registry.authenticate(made.token)
    assert principal == Principal(
        "edge",
        Role.NODE,
        node_id="edge",
        executors=frozenset({"shell"}),
        labels={"z": "a"},
        token_id=made.row.id,
    )
    _, secret = parse_token(made.token)
    await store.close()
    on_disk = _files_of(tmp_path, "s.db*")
    assert secret.encode() not in on_disk
    assert made.row.secret_hash in on_disk


async def test_expiry_revocation_and_forgery(store: SqliteStore) -> None:
    clock = Clock()
    registry = TokenRegistry(store, wall=clock)
    brief = await registry.create(
        name="brief", role=Role.READER, created_by="root", ttl=timedelta(minutes=5)
    )
    kept = await registry.create(name="kept", role=Role.READER, created_by="root")
    registry.authenticate(brief.token)
    clock.now += 301
    with pytest.raises(Unauthenticated, match="expired"):
        registry.authenticate(brief.token)
    token_id, secret = parse_token(kept.token)
    with pytest.raises(Unauthenticated, match="invalid"):
        registry.authenticate(f"shoal_{token_id}_{secret[:-1]}{'B' if secret[-1] == 'A' else 'A'}")
    with pytest.raises(Unauthenticated, match="malformed"):
        registry.authenticate("Bearer nonsense")
    assert registry.authenticate(kept.token).name == "kept"  # remembered as valid, until:
    await registry.revoke("kept")
    with pytest.raises(Unauthenticated, match="revoked"):
        registry.authenticate(kept.token)
    with pytest.raises(NotFound):
        await registry.revoke("kept")

    reloaded = TokenRegistry(store, wall=clock)
    await reloaded.load()
    with pytest.raises(Unauthenticated, match="revoked"):
        reloaded.authenticate(kept.token)
    assert {r.name for r in reloaded.active()} == {"brief"}


async def test_bad_token_requests_are_refused(store: SqliteStore) -> None:
    registry = TokenRegistry(store)
    await registry.create(name="a", role=Role.READER, created_by="root")
    with pytest.raises(AlreadyExists):
        await registry.create(name="a", role=Role.READER, created_by="root")
    for kwargs in (
        {"name": ""},
        {"name": "x\n"},
        {"name": "b", "ttl": timedelta(0)},
        {"name": "c", "node_id": "n1"},  # node claims on a reader token
        {"name": "d", "role": Role.ADMIN, "tenant": "t"},
    ):
        args = {"role": Role.READER, "created_by": "root", **kwargs}
        with pytest.raises(InvalidArgument):
            await registry.create(**args)  # type: ignore[arg-type]


async def test_bootstrap_writes_a_private_admin_token_once(
    store: SqliteStore, tmp_path: Path
) -> None:
    registry = TokenRegistry(store)
    path = tmp_path / "data" / "admin.token"
    assert await registry.bootstrap_admin(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert registry.authenticate(path.read_text().strip()).role is Role.ADMIN
    assert not await registry.bootstrap_admin(path)  # a working token is kept
    path.unlink()
    assert await registry.bootstrap_admin(path)  # a lost one is replaced, the old revoked
    assert [r.name for r in registry.active()] == ["local-admin"]


def test_a_tenant_principal_is_confined_to_its_tenant() -> None:
    acme = Principal("a", Role.SUBMITTER, tenant="acme")
    acme.check_tenant("acme", "task t")
    with pytest.raises(PermissionDenied):
        acme.check_tenant("globex", "task t")
    assert acme.scoped_tenant("") == "acme"
    with pytest.raises(PermissionDenied):
        acme.scoped_tenant("globex")
    assert Principal("r", Role.READER).scoped_tenant("globex") == "globex"


async def test_a_pool_token_admits_node_ids_after_its_prefix_only(store: SqliteStore) -> None:
    registry = TokenRegistry(store)
    made = await registry.create(
        name="pool", role=Role.NODE, created_by="root", node_id="shoal-node-*"
    )
    principal = registry.authenticate(made.token)
    for node_id, admitted in [
        ("shoal-node-7f9c4-x2x9z", True),
        ("shoal-node-a", True),
        ("shoal-node-", False),
        ("shoal-nod", False),
        ("gpu-1", False),
        ("Shoal-node-a", False),
    ]:
        hello = node_pb2.Hello(info=node_pb2.NodeInfo(node_id=node_id))

        def prove(node_id: str = node_id) -> bytes:
            return registry.prove(
                Direction.JOIN,
                token_id=made.row.id,
                node_id=node_id,
                address="a:1",
                nonce=b"n" * 16,
            )

        if admitted:
            check_hello(hello, principal, Limits())
            assert prove()
        else:
            with pytest.raises(PermissionDenied):
                check_hello(hello, principal, Limits())
            with pytest.raises(PermissionDenied):
                prove()

    for bad in ("*", "a*b", "**", "a**"):
        with pytest.raises(InvalidArgument, match="PREFIX"):
            await registry.create(name=f"bad{bad}", role=Role.NODE, created_by="r", node_id=bad)


@pytest.mark.parametrize(
    "info",
    [
        node_pb2.NodeInfo(node_id="n", hostname="h" * 2_000_000),
        node_pb2.NodeInfo(node_id="n", version="v" * 300),
        node_pb2.NodeInfo(node_id="pool-\x1b[2Jx"),
        node_pb2.NodeInfo(node_id="n", hostname="h\x1b]52;c;cm0=\x07"),
        node_pb2.NodeInfo(node_id="n", python_version="3.11\n"),
        node_pb2.NodeInfo(node_id="n", labels={"zone": "a\x1b[31m"}),
        node_pb2.NodeInfo(node_id="n", detected_gpus=[node_pb2.Gpu(name="g")] * 1000),
        node_pb2.NodeInfo(node_id="n", detected_gpus=[node_pb2.Gpu(name="g" * 300)]),
    ],
)
def test_what_a_node_says_of_itself_is_bounded_printable_text(info: node_pb2.NodeInfo) -> None:
    """It is shown in listings and terminals: a 2 MB hostname made `shoal nodes` print 60 MB."""
    with pytest.raises(InvalidArgument, match="node info over its bounds"):
        check_hello(node_pb2.Hello(info=info), Principal("n", Role.ADMIN), Limits())
    good = node_pb2.NodeInfo(node_id="n", hostname="box-1.lan", version="0.1.0")
    check_hello(node_pb2.Hello(info=good), Principal("n", Role.ADMIN), Limits())


async def test_a_tenant_has_no_slash(store: SqliteStore) -> None:
    """Tenant a's lock "b/db" is `tenant/a/b/db`, which tenant "a/b" would name "db"."""
    registry = TokenRegistry(store)
    with pytest.raises(InvalidArgument, match="no '/'"):
        await registry.create(name="x", role=Role.SUBMITTER, created_by="r", tenant="a/b")
    await registry.create(name="y", role=Role.SUBMITTER, created_by="r", tenant="a")
