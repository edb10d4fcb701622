"""The proof a coordinator gives a node, and what counts as a server's own address."""

from __future__ import annotations

import pytest

from shoal.handshake import Direction, OwnAddresses, coordinator_proof, split_address

pytestmark = pytest.mark.timeout(10)


def _proof(**changed: object) -> bytes:
    fields: dict[str, object] = {
        "token_id": "abc",
        "node_id": "n1",
        "address": "10.0.0.5:7070",
        "nonce": b"n" * 32,
        **changed,
    }
    direction = fields.pop("direction", Direction.JOIN)
    assert isinstance(direction, Direction)
    return coordinator_proof(b"k" * 32, direction, **fields)  # type: ignore[arg-type]


def test_a_proof_changes_with_every_field_and_fields_cannot_run_into_each_other() -> None:
    base = _proof()
    changes: list[dict[str, object]] = [
        {"direction": Direction.ATTACH},
        {"token_id": "abd"},
        {"node_id": "n2"},
        {"address": "10.0.0.6:7070"},
        {"nonce": b"m" * 32},
        # The same bytes, split differently between two fields.
        {"token_id": "abcn", "node_id": "1"},
    ]
    proofs = {_proof(**change) for change in changes}
    assert base not in proofs and len(proofs) == len(changes)
    assert (
        coordinator_proof(
            b"j" * 32,
            Direction.JOIN,
            token_id="abc",
            node_id="n1",
            address="10.0.0.5:7070",
            nonce=b"n" * 32,
        )
        != base
    )


@pytest.mark.parametrize(
    ("address", "parsed"),
    [("10.0.0.5:7070", ("10.0.0.5", 7070)), ("[::1]:80", ("::1", 80)), ("a.lan:1", ("a.lan", 1))],
)
def test_addresses_split_into_host_and_port(address: str, parsed: tuple[str, int]) -> None:
    assert split_address(address) == parsed


@pytest.mark.parametrize("address", ["", "7070", "host:", ":7070", "host:0", "host:70000", "h:x"])
def test_what_is_not_host_and_port_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match="host"):
        split_address(address)


async def test_own_addresses_are_this_machines_on_the_bound_port_or_configured() -> None:
    own = OwnAddresses(7070, also=["gateway.example:443"])
    assert await own.async_contains("127.0.0.1:7070")
    assert await own.async_contains("localhost:7070")  # a name that resolves here
    assert await own.async_contains("GATEWAY.example:443")  # as configured
    assert not await own.async_contains("127.0.0.1:7071")  # another port
    assert not await own.async_contains("192.0.2.1:7070")  # not this machine (TEST-NET-1)
    assert not await own.async_contains("no-such-host.invalid:7070")
    assert not await own.async_contains("garbage")
    assert not await own.async_contains("x" * 300 + ":7070")
