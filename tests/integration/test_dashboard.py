"""The dashboard in Debian's chromium (driven by Playwright) against a real coordinator and
node with the HTTP API on: log in, watch tasks finish live, follow a task's output, cancel one,
drain a node; hostile text shows as text. Screenshots of each view go to
test-artifacts/dashboard/."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import ConsoleMessage, Dialog, Page, async_playwright, expect

from shoal import shell
from shoal.v1 import task_pb2

from .harness import Mesh, MeshFactory, eventually, gate_script

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
HOSTILE = "<img src=x onerror=alert(1)>"
HOSTILE_OUT = "<script>alert(2)</script><b>not bold</b>"

_ALL_CHARTS_HAVE = """(n) => [...document.querySelectorAll(".chart")]
    .every((c) => Number(c.dataset.points || 0) >= n)"""

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed"),
]


@pytest.fixture
async def dash(mesh_factory: MeshFactory) -> Mesh:
    # No resource guard: a busy test machine must not hold the tasks back.
    return await mesh_factory(slots=4, guard=False, coordinator={"http_listen": "127.0.0.1:0"})


@pytest.fixture
async def page(dash: Mesh) -> AsyncIterator[Page]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        context = await browser.new_context(viewport={"width": 1440, "height": 960})
        pg = await context.new_page()
        try:
            yield pg
        finally:
            await browser.close()


async def _shot(page: Page, name: str) -> None:
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def test_the_dashboard_shows_the_mesh_live_and_controls_it(
    dash: Mesh, page: Page, tmp_path: Path
) -> None:
    expect.set_options(timeout=15_000)
    pg = page
    problems: list[str] = []
    dialogs: list[str] = []
    pg.on("pageerror", lambda err: problems.append(f"page error: {err}"))

    def on_console(msg: ConsoleMessage) -> None:
        # The wrong token's 401 is expected; anything else logged as an error is a fault.
        if msg.type == "error" and "401" not in msg.text:
            problems.append(f"console: {msg.text} ({msg.location.get('url', '')})")

    pg.on("console", on_console)

    async def on_dialog(dialog: Dialog) -> None:
        dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.accept()

    pg.on("dialog", on_dialog)
    url = dash.coordinator.http_url

    # Log in once with the admin token.
    await pg.goto(url)
    await expect(pg.locator("form.login")).to_be_visible()
    await _shot(pg, "login")
    await pg.fill("#token", "shoal_nope_wrong")
    await pg.click("form.login button")
    await expect(pg.locator("form.login .error")).to_contain_text("refused")
    await pg.fill("#token", dash.token)
    await pg.click("form.login button")
    await expect(pg.locator("#nav a", has_text="Nodes")).to_be_visible()
    await expect(pg.locator(".tile .value").first).not_to_have_text("")

    # A batch finishes live on the tasks view, with a hostile name and output among them.
    await pg.goto(f"{url}#/tasks")
    await expect(pg.locator(".live-dot:not(.off)")).to_be_visible()
    specs = [
        shell(f"echo task-{i}", name=f"batch-{i}", metadata={"half": "ab"[i % 2]})
        for i in range(30)
    ]
    specs.append(shell(f"printf '%s' '{HOSTILE_OUT}'", name=HOSTILE, metadata={"x": HOSTILE}))
    ids = await dash.client.submit_batch(specs)
    done = pg.locator("tbody .badge", has_text="succeeded")
    await expect(done).to_have_count(31)
    await expect(pg.locator("td", has_text=HOSTILE)).to_have_count(1)
    await _shot(pg, "tasks")

    # Filtered by the coordinator: executor and label, from the form; a bad label says so.
    await pg.fill("input[name=executor]", "shell")
    await pg.fill("input[name=label]", "half=a")
    await pg.click("form.filters button[type=submit]")
    await expect(pg.locator("tbody tr")).to_have_count(15)
    await expect(pg.locator("tbody td", has_text="batch-0")).to_have_count(1)
    await _shot(pg, "tasks-filtered")
    await pg.fill("input[name=label]", "half")
    await pg.click("form.filters button[type=submit]")
    await expect(pg.locator(".card .error")).to_contain_text("key=value")

    # The hostile task renders as text: its name, metadata and output, and no markup runs.
    await pg.goto(f"{url}#/tasks/{ids[-1]}")
    await expect(pg.locator("#output")).to_have_text(HOSTILE_OUT)
    await expect(pg.locator("main h1")).to_have_text(HOSTILE)
    assert await pg.locator("main img, main script, #output b").count() == 0

    # A running task's output streams in while it runs.
    gate = tmp_path / "gate"
    slow = await dash.client.submit(
        shell(
            "echo first line; " + gate_script(gate, "echo second line"),
            name="streaming",
            depends_on=[ids[0]],
        )
    )
    await pg.goto(f"{url}#/tasks/{slow.id}")
    await expect(pg.locator("#output")).to_contain_text("first line")
    await expect(pg.locator("main .head .badge")).to_have_text("running")
    await expect(pg.locator(".gnode", has_text=ids[0])).to_be_visible()
    await _shot(pg, "task-running")
    gate.touch()
    await expect(pg.locator("#output")).to_contain_text("second line")
    await expect(pg.locator("main .head .badge")).to_have_text("succeeded")
    await _shot(pg, "task")

    # The upstream task's graph shows the streaming task downstream; a click opens it.
    await pg.goto(f"{url}#/tasks/{ids[0]}")
    downstream = pg.locator("#graph .gcol.down .gnode", has_text=slow.id)
    await expect(downstream.locator(".badge")).to_have_text("succeeded")
    await _shot(pg, "task-graph")
    await downstream.click()
    await expect(pg.locator("#task-id")).to_have_text(slow.id)
    await expect(pg.locator("#graph .gcol.up .gnode", has_text=ids[0])).to_be_visible()

    # Cancel a running task from its page.
    stuck = await dash.client.submit(shell(gate_script(tmp_path / "never"), name="stuck"))
    await pg.goto(f"{url}#/tasks/{stuck.id}")
    await expect(pg.locator("main .head .badge")).to_have_text("running")
    await pg.click("text=Cancel task")
    await expect(pg.locator("main .head .badge")).to_have_text("cancelled")
    assert (await dash.client.get(stuck.id)).state == task_pb2.TASK_STATE_CANCELLED

    # The overview's charts move while a batch runs; the event feed follows live.
    await pg.goto(f"{url}#/overview")
    await expect(pg.locator(".uplot")).to_have_count(3)
    await pg.wait_for_function(_ALL_CHARTS_HAVE, arg=2)
    await dash.client.submit_batch([shell("sleep 0.3", name=f"more-{i}") for i in range(24)])
    await pg.wait_for_function(_ALL_CHARTS_HAVE, arg=6)
    await _shot(pg, "overview")
    await pg.goto(f"{url}#/events")
    await expect(pg.locator(".live-dot:not(.off)")).to_be_visible()
    await dash.client.submit_batch([shell("echo feed", name=f"feed-{i}") for i in range(5)])
    await expect(pg.locator(".feed tbody tr").first).to_be_visible()
    await _shot(pg, "events")

    # Drain the node from the nodes view, then undrain it.
    node_id = dash.node.node_id
    await pg.goto(f"{url}#/nodes")
    card = pg.locator(f'section.node[data-node="{node_id}"]')
    await expect(card.locator(".badge")).to_have_text("healthy")
    await _shot(pg, "nodes")
    await card.locator("button", has_text="Drain").click()
    await expect(card.locator(".badge")).to_have_text("draining")

    async def drained() -> None:
        (status,) = [n for n in await dash.client.nodes() if n.info.node_id == node_id]
        assert status.draining

    await eventually(drained)
    await _shot(pg, "nodes-draining")
    await card.locator("button", has_text="Undrain").click()
    await expect(card.locator(".badge")).to_have_text("healthy")

    # Set a quota from its form; it lists beside the usage of its key.
    await pg.goto(f"{url}#/quotas")
    await pg.fill("input[name=key]", "team:ml")
    await pg.fill("input[name=concurrency]", "3")
    await pg.click("text=Set quota")
    await expect(pg.locator("td code", has_text="team:ml")).to_be_visible()
    assert [q.concurrency for q in await dash.client.quotas()] == [3]

    for view in ("schedules", "quotas", "tokens"):
        await pg.goto(f"{url}#/{view}")
        await expect(pg.locator("main h1")).to_be_visible()
        await pg.wait_for_load_state("networkidle")
        await _shot(pg, view)

    assert all(d.startswith("confirm:") for d in dialogs), dialogs
    assert not problems, problems
