"""What coordinators and nodes advertise (TXT records) and how a node chooses its coordinator."""

from __future__ import annotations

import pytest

from shoal.discovery import (
    AmbiguousCoordinator,
    CoordinatorAd,
    NodeAd,
    advertised_hosts,
    advertises,
    choose_coordinator,
    instance_label,
    is_loopback,
    is_wildcard,
)
from shoal.errors import FailedPrecondition


def _coordinator(name: str, cluster: str, host: str = "10.0.0.1") -> CoordinatorAd:
    return CoordinatorAd(
        name=f"{name}._shoal._tcp.local.", hosts=(host,), port=7070, cluster=cluster
    )


def _txt_bytes(txt: dict[str, str]) -> list[int]:
    return [len(f"{k}={v}".encode()) for k, v in txt.items()]


def test_a_node_record_survives_the_round_trip_with_awkward_values() -> None:
    ad = NodeAd(
        name="gpu-1._shoal-node._tcp.local.",
        hosts=("10.0.0.7",),
        port=50051,
        node_id="gpu-1",
        cluster="lab",
        version="0.1.0",
        executors=("shell", "python", "custom,with=odd%chars"),
        labels={"gpu": "true", "zone": "eu-1", "a,b": "c=d", "pct": "100%", "empty": ""},
        models=("llama3:8b", "qwen2.5"),
    )
    txt = ad.txt()
    assert txt["txtvers"] == "1"
    assert txt["labels"] == "a%2Cb=c%3Dd,empty=,gpu=true,pct=100%25,zone=eu-1"
    assert "truncated" not in txt
    back = NodeAd.from_txt(ad.name, ad.hosts, ad.port, txt)
    assert back == ad
    assert back.address == "10.0.0.7:50051"


def test_a_node_record_holds_no_secret_and_fits_dns_sd_limits() -> None:
    labels = {f"label-{i:03}": "x" * 20 for i in range(40)}
    ad = NodeAd(
        name="n",
        hosts=("10.0.0.7",),
        port=1,
        node_id="n" * 300,
        executors=tuple(f"executor-{i}" for i in range(60)),
        labels=labels,
    )
    txt = ad.txt()
    assert max(_txt_bytes(txt)) <= 255
    assert set(txt) == {
        "txtvers",
        "id",
        "cluster",
        "version",
        "executors",
        "labels",
        "models",
        "tls",
        "truncated",
    }
    back = NodeAd.from_txt("n._shoal-node._tcp.local.", ("10.0.0.7",), 1, txt)
    # What did not fit is left out whole, and said so.
    assert set(back.truncated) == {"id", "executors", "labels"}
    assert back.executors == ad.executors[: len(back.executors)]
    assert all(labels[k] == v for k, v in back.labels.items())
    assert 0 < len(back.labels) < len(labels)


def test_a_coordinator_record_says_what_a_node_needs_and_nothing_else() -> None:
    ad = CoordinatorAd(
        name="lab on box._shoal._tcp.local.",
        hosts=("fe80::1", "10.0.0.5"),
        port=7070,
        cluster="lab",
        version="0.1.0",
        tls=True,
        auth=True,
    )
    txt = ad.txt()
    assert txt == {
        "txtvers": "1",
        "cluster": "lab",
        "version": "0.1.0",
        "tls": "true",
        "auth": "true",
    }
    back = CoordinatorAd.from_txt(ad.name, ad.hosts, ad.port, txt)
    assert back == ad
    assert back.address == "[fe80::1]:7070"


def test_records_from_other_implementations_decode_leniently() -> None:
    node = NodeAd.from_txt("x._shoal-node._tcp.local.", ("10.0.0.9",), 5, {"labels": "a=1,junk,=2"})
    assert (node.node_id, node.cluster, node.labels, node.executors) == (
        "x",
        "default",
        {"a": "1"},
        (),
    )
    coordinator = CoordinatorAd.from_txt("c", ("10.0.0.1",), 1, {"tls": None, "auth": "YES"})
    assert (coordinator.cluster, coordinator.tls, coordinator.auth) == ("default", False, True)


def test_the_node_chooses_the_coordinator_of_its_cluster() -> None:
    seen = [_coordinator("a", "lab"), _coordinator("b", "default"), _coordinator("c", "prod")]
    chosen = choose_coordinator(seen, "default")
    assert chosen is not None and chosen.name.startswith("b.")
    assert choose_coordinator(seen, "prod") == seen[2]


def test_no_coordinator_of_the_cluster_means_none_yet() -> None:
    assert choose_coordinator([], "default") is None
    assert choose_coordinator([_coordinator("a", "lab")], "default") is None


def test_several_coordinators_of_one_cluster_are_an_error_that_lists_them() -> None:
    seen = [
        _coordinator("one", "lab", "10.0.0.1"),
        _coordinator("two", "lab", "10.0.0.2"),
        _coordinator("other", "prod"),
    ]
    with pytest.raises(AmbiguousCoordinator) as raised:
        choose_coordinator(seen, "lab")
    err = raised.value
    assert isinstance(err, FailedPrecondition)
    assert [c.name for c in err.candidates] == ["one._shoal._tcp.local.", "two._shoal._tcp.local."]
    assert "10.0.0.1:7070" in err.message and "10.0.0.2:7070" in err.message
    assert "--coordinator" in err.message
    assert "prod" not in err.message


@pytest.mark.parametrize(
    ("mode", "listen", "expected"),
    [
        ("auto", "127.0.0.1:7070", False),
        ("auto", "localhost:7070", False),
        ("auto", "[::1]:7070", False),
        ("auto", "0.0.0.0:7070", True),
        ("auto", "10.1.2.3:0", True),
        ("on", "127.0.0.1:7070", True),
        ("off", "0.0.0.0:7070", False),
    ],
)
def test_servers_advertise_beyond_loopback_or_when_asked(
    mode: str, listen: str, expected: bool
) -> None:
    assert advertises(mode, listen) is expected  # type: ignore[arg-type]


def test_listen_addresses() -> None:
    assert is_loopback("127.0.0.2:1") and not is_loopback("10.0.0.1:1")
    assert is_wildcard("0.0.0.0:7070") and is_wildcard("[::]:7070") and is_wildcard(":7070")
    assert not is_wildcard("10.0.0.1:7070")


async def test_advertised_hosts() -> None:
    assert await advertised_hosts("10.1.2.3:7070") == ["10.1.2.3"]
    every = await advertised_hosts("0.0.0.0:7070")
    assert "127.0.0.1" not in every
    assert all(":" not in host for host in every)  # IPv4 only


def test_instance_labels_are_one_dns_label() -> None:
    assert instance_label("gpu-1.lab") == "gpu-1-lab"
    long = instance_label("é" * 100)
    assert len(long.encode()) <= 63 and long == "é" * 31
