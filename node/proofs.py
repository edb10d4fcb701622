"""A coordinator proves it issued this node's token before the node trusts it: one the node
found by itself before the node sends its token (NodeGateway.Identify), and one that dialled
the node (Node.Attach) before the node sends its Hello."""

from __future__ import annotations

import hmac
import logging
import os
from typing import TYPE_CHECKING

import grpc

from shoal.auth import hash_secret, parse_token
from shoal.errors import Unauthenticated
from shoal.handshake import Direction, OwnAddresses, coordinator_proof
from shoal.v1 import gateway_pb2_grpc, node_pb2

if TYPE_CHECKING:
    from shoal.node.session import SessionStream

__all__ = ["Unproven", "challenge", "identify"]

_log = logging.getLogger("shoal.node")
_IDENTIFY_TIMEOUT = 5.0  # seconds a coordinator the node found has to prove itself


class Unproven(Exception):
    """A coordinator the node found did not prove it issued the node's token."""


async def identify(
    stub: gateway_pb2_grpc.NodeGatewayStub, address: str, token: str, node_id: str
) -> None:
    """Have a coordinator this node found (mDNS, loopback) prove it issued the node's token,
    for the address dialled, before the token is sent to it."""
    token_id, secret = parse_token(token)
    nonce = os.urandom(32)
    asked = node_pb2.Challenge(token_id=token_id, nonce=nonce, node_id=node_id, address=address)
    try:
        proof = await stub.Identify(asked, timeout=_IDENTIFY_TIMEOUT)
    except grpc.aio.AioRpcError as err:
        _log.warning(
            "node=%s will not send its token to %s: it did not prove it issued it (%s %s)",
            node_id,
            address,
            err.code().name,
            err.details(),
        )
        raise Unproven(err.details()) from err
    expected = coordinator_proof(
        hash_secret(secret),
        Direction.JOIN,
        token_id=token_id,
        node_id=node_id,
        address=address,
        nonce=nonce,
    )
    if not hmac.compare_digest(proof.mac, expected):
        _log.warning(
            "node=%s will not send its token to %s: its proof does not hold", node_id, address
        )
        raise Unproven("the coordinator's proof does not hold")


async def challenge(
    stream: SessionStream, token: str, node_id: str, peer: str, own: OwnAddresses
) -> None:
    """Have the coordinator that dialled this node prove it issued the node's token."""
    token_id, secret = parse_token(token)
    nonce = os.urandom(32)
    await stream.write(
        node_pb2.NodeMessage(
            challenge=node_pb2.Challenge(token_id=token_id, nonce=nonce, node_id=node_id)
        )
    )
    answer = await stream.read()
    proof = (
        answer.proof
        if isinstance(answer, node_pb2.CoordinatorMessage) and answer.WhichOneof("msg") == "proof"
        else node_pb2.Proof()
    )
    expected = coordinator_proof(
        hash_secret(secret),
        Direction.ATTACH,
        token_id=token_id,
        node_id=node_id,
        address=proof.address,
        nonce=nonce,
    )
    if not hmac.compare_digest(proof.mac, expected):
        _log.warning("node=%s refused a coordinator at %s: no proof", node_id, peer)
        raise Unauthenticated("only the coordinator that issued this node's token may attach it")
    if not await own.async_contains(proof.address):
        _log.warning(
            "node=%s refused a coordinator at %s: it dialled %r, not an address of this node"
            " (list the addresses coordinators reach it at in reachable_at)",
            node_id,
            peer,
            proof.address,
        )
        raise Unauthenticated(f"{proof.address!r} is not this node's address")
