"""The HTTP/JSON API over real HTTP: the gRPC matrix of roles and tenants, cookie sessions,
CSRF, logins, bad input, and what a refusal logs."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from google.protobuf import descriptor_pool, json_format
from openapi_spec_validator import validate

from shoal import shell
from shoal.coordinator.http.auth import Sessions
from shoal.coordinator.http.limits import LoginLimit
from shoal.errors import ResourceExhausted
from shoal.v1 import admin_pb2, task_pb2

from .harness import Mesh, MeshFactory, run_tool
from .test_auth import EXPECTED, ROLES, Fixture, _requests, roles

pytestmark = pytest.mark.timeout(60)

__all__ = ["roles"]  # the fixture, shared with the gRPC matrix test

README = Path(__file__).resolve().parents[2] / "README.md"
SERVED = ("shoal.v1.Tasks", "shoal.v1.Admin", "shoal.v1.Locks")


@pytest.fixture
async def mesh(mesh_factory: MeshFactory) -> Mesh:
    """A mesh whose coordinator serves HTTP too (the matrix fixture `roles` builds on it)."""
    return await mesh_factory(slots=4, coordinator={"http_listen": "127.0.0.1:0"})


@pytest.fixture
async def http(mesh: Mesh) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mesh.coordinator.http_url, timeout=20) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_each_role_gets_exactly_the_methods_it_has_over_grpc(roles: Fixture) -> None:
    """Every unary method of the served services, for every role, answers as over gRPC: the
    routes come from the descriptors, the decision from the same policy."""
    requests = _requests(roles)
    pool = descriptor_pool.Default()
    served = [m for s in SERVED for m in pool.FindServiceByName(s).methods]
    got: dict[tuple[str, str], int] = {}
    async with httpx.AsyncClient(base_url=roles.mesh.coordinator.http_url, timeout=20) as http:
        for method in served:
            path = f"/{method.containing_service.full_name}/{method.name}"
            for role in ROLES:
                body = json_format.MessageToDict(await requests[path]())
                if method.server_streaming:  # Watch: the live events route
                    async with http.stream(
                        "GET", "/api/events", headers=bearer(roles.tokens[role])
                    ) as response:
                        got[path, role] = response.status_code
                else:
                    response = await http.post(
                        f"/api{path}", json=body, headers=bearer(roles.tokens[role])
                    )
                    got[path, role] = response.status_code
                    if response.status_code == 403:
                        assert response.json()["code"] == "permission_denied"
    expected = {
        (path, role): 200 if role == "admin" or role in allowed else 403
        for path, allowed in EXPECTED.items()
        if path.split("/")[1] in SERVED
        for role in ROLES
    }
    assert got == expected
    # Not served: a node's session, reflection, health.
    async with httpx.AsyncClient(base_url=roles.mesh.coordinator.http_url) as http:
        for path in ("/shoal.v1.NodeGateway/Connect", "/grpc.health.v1.Health/Check"):
            response = await http.post(f"/api{path}", json={}, headers=bearer(roles.mesh.token))
            assert response.status_code == 404 and response.json()["code"] == "not_found"


async def test_no_credentials_and_bad_tokens_are_refused(
    mesh: Mesh, http: httpx.AsyncClient
) -> None:
    response = await http.post("/api/shoal.v1.Tasks/List", json={})
    assert response.status_code == 401
    assert response.json()["code"] == "unauthenticated"
    assert "Bearer" in response.headers["WWW-Authenticate"]
    for header in ("Basic abc", "Bearer", "Bearer shoal_x_y", "Bearer not-a-token"):
        response = await http.post(
            "/api/shoal.v1.Tasks/List", json={}, headers={"Authorization": header}
        )
        assert response.status_code == 401, header


async def test_a_tenant_sees_and_touches_only_its_own_tasks(
    mesh: Mesh, http: httpx.AsyncClient
) -> None:
    tokens = {}
    for tenant in ("acme", "globex"):
        made = await mesh.client.create_token(
            admin_pb2.CreateTokenRequest(name=tenant, role=admin_pb2.ROLE_SUBMITTER, tenant=tenant)
        )
        tokens[tenant] = made.token
    spec = {"shell": {"argv": ["sleep", "30"]}}
    mine = await http.post(
        "/api/shoal.v1.Tasks/Submit", json={"spec": spec}, headers=bearer(tokens["acme"])
    )
    assert mine.status_code == 200, mine.text
    task = mine.json()["task"]
    assert task["spec"]["tenant"] == "acme"
    for method in ("Get", "Cancel"):
        probe = await http.post(
            f"/api/shoal.v1.Tasks/{method}",
            json={"taskId": task["id"]},
            headers=bearer(tokens["globex"]),
        )
        assert probe.status_code == 404 and probe.json()["code"] == "not_found"
    listed = await http.post(
        "/api/shoal.v1.Tasks/List", json={"tenant": "acme"}, headers=bearer(tokens["globex"])
    )
    assert listed.status_code == 403
    theirs = await http.post("/api/shoal.v1.Tasks/List", json={}, headers=bearer(tokens["globex"]))
    assert theirs.json().get("tasks", []) == []
    ok = await http.post(
        "/api/shoal.v1.Tasks/Cancel", json={"taskId": task["id"]}, headers=bearer(tokens["acme"])
    )
    assert ok.status_code == 200
    assert (await mesh.client.wait(task["id"])).state == task_pb2.TASK_STATE_CANCELLED
    # Submit and wait, in one request: the answer is the task as it ended, in its tenant.
    ran = await http.post(
        "/api/shoal.v1.Tasks/Submit",
        json={"spec": {"shell": {"argv": ["echo", "done"]}}, "wait": True},
        headers=bearer(tokens["acme"]),
    )
    assert ran.status_code == 200, ran.text
    ended = ran.json()["task"]
    assert ended["state"] == "TASK_STATE_SUCCEEDED" and ended["result"]["stdout"] == "done\n"
    assert ended["spec"]["tenant"] == "acme"


async def test_bad_input_gets_a_precise_error_and_changes_nothing(
    mesh: Mesh, http: httpx.AsyncClient
) -> None:
    auth = bearer(mesh.token)
    submit = "/api/shoal.v1.Tasks/Submit"
    json_type = {"Content-Type": "application/json"}
    # (body, headers, HTTP status, code, words in the message)
    cases: list[tuple[bytes, dict[str, str], int, str, str]] = [
        (b"{not json", json_type, 400, "invalid_argument", "not JSON"),
        (b"[1, 2]", json_type, 400, "invalid_argument", "JSON object"),
        (b'{"spec": {}, "surprise": 1}', json_type, 400, "invalid_argument", "surprise"),
        (b'{"spec": {"priority": "NOPE"}}', json_type, 400, "invalid_argument", "priority"),
        (b"{}", {"Content-Type": "text/plain"}, 415, "invalid_argument", "application/json"),
        (b"\xff\xfe", json_type, 400, "invalid_argument", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, json_type, 400, "invalid_argument", "not JSON"),
        (b'{"spec": ' * 200 + b"}" * 200, json_type, 400, "invalid_argument", ""),
        (b"{" + b" " * (5 << 20) + b"}", json_type, 413, "resource_exhausted", "cap"),
        (b"\x1f\x8b", {**json_type, "Content-Encoding": "gzip"}, 400, "invalid_argument", "compr"),
    ]
    for content, headers, status, code, words in cases:
        response = await http.post(submit, content=content, headers={**auth, **headers})
        assert response.status_code == status, response.text
        body = response.json()
        assert body["code"] == code and words in body["message"], body
    # A spec the coordinator refuses carries its field violations, as over gRPC.
    response = await http.post(submit, json={"spec": {"shell": {}}}, headers=auth)
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid_argument"
    (detail,) = body["details"]
    assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert detail["fieldViolations"][0]["field"].startswith("spec")
    # Wrong method, unknown route.
    assert (await http.get("/api/shoal.v1.Tasks/List", headers=auth)).status_code == 405
    missing = await http.post("/api/shoal.v1.Tasks/Nope", json={}, headers=auth)
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    assert await mesh.client.list() == []


async def test_a_cookie_session_needs_its_csrf_token_to_change_anything(
    mesh: Mesh, http: httpx.AsyncClient
) -> None:
    refused = await http.post("/api/login", json={"token": "shoal_0_forged"})
    assert refused.status_code == 401 and "shoal_session" not in refused.cookies
    login = await http.post("/api/login", json={"token": mesh.token})
    assert login.status_code == 200
    assert login.json()["role"] == "admin"
    cookies = login.headers.get_list("set-cookie")
    session = next(c for c in cookies if c.startswith("shoal_session="))
    assert "HttpOnly" in session and "SameSite=Strict" in session and "Path=/" in session
    assert mesh.token not in session and mesh.token.split("_", 2)[2] not in " ".join(cookies)
    csrf = http.cookies["shoal_csrf"]
    assert (await http.get("/api/whoami")).json()["role"] == "admin"

    spec = {"spec": {"shell": {"argv": ["true"]}}}
    without = await http.post("/api/shoal.v1.Tasks/Submit", json=spec)
    assert without.status_code == 403 and "X-CSRF-Token" in without.json()["message"]
    wrong = await http.post("/api/shoal.v1.Tasks/Submit", json=spec, headers={"X-CSRF-Token": "x"})
    assert wrong.status_code == 403
    assert await mesh.client.list() == []
    made = await http.post("/api/shoal.v1.Tasks/Submit", json=spec, headers={"X-CSRF-Token": csrf})
    assert made.status_code == 200, made.text

    assert (await http.post("/api/logout")).status_code == 403  # logout is a change too
    out = await http.post("/api/logout", headers={"X-CSRF-Token": csrf})
    assert out.status_code == 200
    assert (await http.get("/api/whoami")).status_code == 401


async def test_logins_are_rate_limited_and_leave_other_sessions_alone(
    mesh: Mesh, http: httpx.AsyncClient
) -> None:
    """A caller that logs in again and again is refused past a burst (429, Retry-After); the
    admin's session, opened before, lives on."""
    async with httpx.AsyncClient(base_url=mesh.coordinator.http_url, timeout=20) as admin:
        assert (await admin.post("/api/login", json={"token": mesh.token})).status_code == 200
        reader = await mesh.client.create_token(
            admin_pb2.CreateTokenRequest(name="r", role=admin_pb2.ROLE_READER)
        )
        answers = [await http.post("/api/login", json={"token": reader.token}) for _ in range(20)]
        refused = [a for a in answers if a.status_code != 200]
        assert refused and {a.status_code for a in refused} == {429}, [a.text for a in refused]
        assert refused[0].json()["code"] == "resource_exhausted"
        assert int(refused[0].headers["Retry-After"]) >= 1
        assert (await admin.get("/api/whoami")).json()["role"] == "admin"


def test_a_tokens_sessions_are_bounded_and_a_login_ends_only_its_own_oldest() -> None:
    """However often one token logs in, it ends only its own oldest sessions (the store,
    without a server)."""
    now = 0.0
    sessions = Sessions(per_owner=2, ttl=timedelta(hours=1), clock=lambda: now)
    admin = sessions.open("admin-token", "admin")
    opened = [sessions.open("reader-token", "reader") for _ in range(1_000)]
    assert sessions.get(admin.id) == admin
    assert [sessions.get(s.id) for s in opened] == [None] * 998 + opened[-2:]
    assert len(sessions) == 3
    sessions.close(opened[-1].id)
    now = 3600.0  # all expired: the next login sweeps them
    sessions.open("reader-token", "reader")
    assert len(sessions) == 1 and sessions.get(admin.id) is None


def test_logins_are_limited_per_key_to_a_burst_then_a_rate() -> None:
    """The login limit alone, its time moved by the test."""
    now = 0.0
    logins = LoginLimit(rate=0.2, burst=10, clock=lambda: now)
    for _ in range(10):
        logins.take(("address", "10.0.0.1"), "from 10.0.0.1")
    with pytest.raises(ResourceExhausted, match="too many logins") as refused:
        logins.take(("address", "10.0.0.1"), "from 10.0.0.1")
    assert refused.value.retry_after == timedelta(seconds=5)
    logins.take(("address", "10.0.0.2"), "from 10.0.0.2")  # another key: its own burst
    now = 5.0
    logins.take(("address", "10.0.0.1"), "from 10.0.0.1")  # one more, 5 s later


async def test_a_refusal_logs_its_message_cut_as_it_answers_it(
    mesh: Mesh, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A request that quotes a long value (a 3 MB tenant name) is refused with its message
    cut, and the log line that tells of it is cut the same way."""
    made = await mesh.client.create_token(
        admin_pb2.CreateTokenRequest(name="r", role=admin_pb2.ROLE_READER, tenant="acme")
    )
    with caplog.at_level(logging.WARNING, logger="shoal.http"):
        refused = await http.post(
            "/api/shoal.v1.Tasks/List", json={"tenant": "g" * 3_000_000}, headers=bearer(made.token)
        )
    assert refused.status_code == 403 and len(refused.content) < 1_000
    (told,) = [r.getMessage() for r in caplog.records if r.name == "shoal.http"]
    assert "PermissionDenied" in told and len(told) < 1_000


async def test_whoami_names_role_tenant_and_token(mesh: Mesh, http: httpx.AsyncClient) -> None:
    made = await mesh.client.create_token(
        admin_pb2.CreateTokenRequest(name="r", role=admin_pb2.ROLE_READER, tenant="acme")
    )
    who = (await http.get("/api/whoami", headers=bearer(made.token))).json()
    assert who["role"] == "reader" and who["tenant"] == "acme"
    assert who["token_id"] == made.info.id


async def test_the_dashboard_is_served_with_a_strict_policy(http: httpx.AsyncClient) -> None:
    index = await http.get("/")
    assert index.status_code == 200 and index.headers["Content-Type"].startswith("text/html")
    assert index.headers["Content-Security-Policy"].startswith("default-src 'self'")
    # (httpx resolves plain `..` segments itself; encoded ones reach the server.)
    for path in (
        "/assets/%2e%2e/index.html",
        "/assets/%2E%2E%2Fdashboard%2Findex.html",
        "/assets/.hidden",
        "/assets/..%2f..%2fpyproject.toml",
        "/../../etc/passwd",
    ):
        assert (await http.get(path)).status_code == 404, path


async def test_the_openapi_document_is_valid_and_lists_every_route(
    http: httpx.AsyncClient,
) -> None:
    response = await http.get("/api/openapi.json")
    assert response.status_code == 200
    document = response.json()
    validate(document)
    pool = descriptor_pool.Default()
    unary = {
        f"/api/{service}/{m.name}"
        for service in SERVED
        for m in pool.FindServiceByName(service).methods
        if not m.server_streaming
    }
    assert set(document["paths"]) == unary | {
        "/api/events",
        "/api/login",
        "/api/logout",
        "/api/whoami",
    }
    submit = document["paths"]["/api/shoal.v1.Tasks/Submit"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/shoal.v1.SubmitRequest"
    }


async def test_the_readme_curl_examples_run_as_written(mesh: Mesh) -> None:
    section = README.read_text().split("\n## HTTP API\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "no sh block in the README's HTTP API section"
    port = mesh.coordinator.http_url.rsplit(":", 1)[1].rstrip("/")
    script = match.group(1).replace(":7080", f":{port}")
    script = script.replace("~/.local/share/shoal", str(mesh.data_dir))
    await mesh.client.wait((await mesh.client.submit(shell(["true"]))).id)  # an event to see
    done = await run_tool(["sh", "-e", "-c", script], timeout=30)
    assert done.returncode == 0, done.stderr
    submitted, listed, nodes, *events = done.stdout.splitlines()
    assert json.loads(submitted)["created"] is True
    assert isinstance(json.loads(listed), dict)
    assert [n["info"]["nodeId"] for n in json.loads(nodes)["nodes"]] == [mesh.node.node_id]
    assert events[0].startswith("id: ") and events[1] == "data: {}"
    assert events[3].startswith("id: ") and "TASK_STATE_SUCCEEDED" in events[4]
