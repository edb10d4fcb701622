"""Where a client finds its coordinator."""

import pytest

from shoal import AsyncClient
from shoal.config import coordinator_target


@pytest.mark.parametrize(
    ("given", "target"),
    [
        ("", "127.0.0.1:7070"),  # SHOAL_COORDINATOR= is unset, as in a shell
        ("box.lan", "box.lan:7070"),  # not gRPC's 443
        ("10.0.0.1:9000", "10.0.0.1:9000"),
        ("a, b:7071", "a:7070,b:7071"),
        ("[::1]", "[::1]:7070"),
        ("dns:///box.lan:7070", "dns:///box.lan:7070"),
    ],
)
def test_an_address_without_a_port_has_shoals(given: str, target: str) -> None:
    assert coordinator_target(given) == target


async def test_an_empty_address_in_the_environment_is_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SHOAL_COORDINATOR", "")
    async with AsyncClient(token="t") as client:
        assert client.target == "127.0.0.1:7070"
