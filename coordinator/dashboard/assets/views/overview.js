// The mesh at a glance: Admin.GetOverview once a second, drawn as live charts and tiles.

import { call } from "../api.js";
import { LiveChart } from "../chart.js";
import { fill, h, num, PRIORITIES, priorityName, toast } from "../dom.js";

const OUTCOMES = ["SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELLED", "SKIPPED"];
const POLL_MS = 1000;
const RATE_WINDOW = 60; // seconds of outcomes the failure rate covers

export function renderOverview(main) {
  const tiles = h("div", { class: "tiles" });
  const rate = new LiveChart("Tasks finished per second, by outcome", OUTCOMES);
  const depth = new LiveChart("Queue depth by priority", PRIORITIES);
  const load = new LiveChart("Running tasks and free slots", ["running", "free"]);
  const tenants = h("div", { class: "bars" });
  const held = h("div", {});
  fill(main,
    h("div", { class: "head" }, h("h1", {}, "Overview"), h("span", { class: "live-dot", id: "ov-status" }, "live")),
    tiles,
    h("div", { class: "charts" }, rate.el, depth.el, load.el,
      h("section", { class: "card wide" }, h("h3", {}, "Queued and unfinished by tenant"), tenants),
      h("section", { class: "card" }, h("h3", {}, "Held back by quotas and locks"), held)));
  [rate, depth, load].forEach((c) => c.fit());

  let last = null;
  const history = []; // [t, finished totals] for the failure rate
  let stopped = false;
  let failing = false;

  async function tick() {
    let ov;
    try {
      ov = await call("Admin", "GetOverview", {});
      if (failing) document.getElementById("ov-status")?.classList.remove("off");
      failing = false;
    } catch (err) {
      if (!failing) toast(`Overview: ${err.message}`, "error");
      failing = true;
      document.getElementById("ov-status")?.classList.add("off");
      return;
    }
    if (stopped) return;
    const t = Date.now() / 1000;
    const finished = Object.fromEntries(OUTCOMES.map((s) => [s, Number(ov.finished?.[s] || 0)]));
    if (last) {
      const dt = Math.max(0.001, t - last.t);
      rate.push(t, Object.fromEntries(OUTCOMES.map((s) => [s, Math.max(0, (finished[s] - last.finished[s]) / dt)])));
    }
    last = { t, finished };
    history.push({ t, finished });
    while (history.length > 1 && t - history[0].t > RATE_WINDOW) history.shift();

    const byPriority = Object.fromEntries(PRIORITIES.map((p) => [p, 0]));
    const byTenant = {};
    for (const q of ov.queued || []) {
      byPriority[priorityName(q.priority)] += Number(q.tasks || 0);
      byTenant[q.tenant || ""] = (byTenant[q.tenant || ""] || 0) + Number(q.tasks || 0);
    }
    depth.push(t, byPriority);
    load.push(t, { running: Number(ov.running || 0), free: Number(ov.freeSlots || 0) });

    const first = history[0].finished;
    const done = OUTCOMES.reduce((s, k) => s + finished[k] - first[k], 0);
    const bad = finished.FAILED - first.FAILED + finished.TIMED_OUT - first.TIMED_OUT;
    const queued = Object.values(byPriority).reduce((a, b) => a + b, 0);
    const heldTotal = Object.values(ov.held || {}).reduce((a, b) => a + Number(b), 0);
    fill(tiles,
      tile("Running", num(ov.running), "tasks on nodes"),
      tile("Queued", num(queued), "ready, waiting for a node"),
      tile("Failure rate", done ? `${((100 * bad) / done).toFixed(1)}%` : "–", `of ${num(done)} finished in the last minute`, bad ? "warn" : ""),
      tile("Open breakers", num(ov.breakersOpen), "circuit breakers not closed", Number(ov.breakersOpen) ? "bad" : ""),
      tile("Held by gates", num(heldTotal), "quota and lock waits", heldTotal ? "warn" : ""),
      tile("Nodes", num(ov.nodes), Number(ov.nodesDraining) ? `${num(ov.nodesDraining)} draining` : `${num(ov.freeSlots)} free slots`));
    drawTenants(tenants, byTenant, ov.unfinished || {});
    drawHeld(held, ov.held || {});
  }

  tick();
  const timer = setInterval(tick, POLL_MS);
  return () => {
    stopped = true;
    clearInterval(timer);
    [rate, depth, load].forEach((c) => c.destroy());
  };
}

function tile(label, value, note, kind = "") {
  return h("div", { class: `tile ${kind}` }, h("div", { class: "label" }, label), h("div", { class: "value" }, value), h("div", { class: "note" }, note));
}

function drawTenants(box, queued, unfinished) {
  const names = [...new Set([...Object.keys(queued), ...Object.keys(unfinished)])]
    .sort((a, b) => Number(unfinished[b] || 0) - Number(unfinished[a] || 0)).slice(0, 12);
  const top = Math.max(1, ...names.map((n) => Number(unfinished[n] || queued[n] || 0)));
  fill(box, names.length ? names.map((name) => {
    const q = Number(queued[name] || 0);
    const u = Number(unfinished[name] || 0);
    const bar = h("div", { class: "bar" }, h("span", { class: "fill-u" }), h("span", { class: "fill-q" }));
    bar.children[0].style.width = `${(100 * u) / top}%`;
    bar.children[1].style.width = `${(100 * q) / top}%`;
    return h("div", { class: "bar-row" }, h("span", { class: `bar-name${name ? "" : " muted"}` }, name || "(no tenant)"), bar,
      h("span", { class: "bar-value" }, `${num(q)} queued · ${num(u)} unfinished`));
  }) : h("p", { class: "empty" }, "No tasks waiting."));
}

function drawHeld(box, held) {
  const keys = Object.entries(held).sort((a, b) => Number(b[1]) - Number(a[1])).slice(0, 20);
  fill(box, keys.length ? h("ul", { class: "plain" }, keys.map(([k, n]) =>
    h("li", {}, h("code", {}, k), " ", h("span", { class: "muted" }, `${num(n)} waiting`)))) :
    h("p", { class: "empty" }, "Nothing held back."));
}
