// The event feed: every change as it happens, filtered by tenant, task, state and kind.

import { LiveEvents } from "../live.js";
import { badge, fill, h, STATES } from "../dom.js";

const KEEP = 500; // rows on the page

export function renderEvents(main, { query }) {
  const tenant = query.get("tenant") || "";
  const task = query.get("task") || "";
  const state = STATES.includes(query.get("state")) ? query.get("state") : "";
  const output = query.get("output") === "1";
  const form = h("form", { class: "filters card row" },
    h("label", { class: "field" }, h("span", {}, "Tenant"), h("input", { name: "tenant", value: tenant })),
    h("label", { class: "field" }, h("span", {}, "Task id"), h("input", { name: "task", value: task })),
    h("label", { class: "field" }, h("span", {}, "State"), h("select", { name: "state" },
      h("option", { value: "" }, "any"), STATES.map((s) => h("option", { value: s, selected: s === state }, s.toLowerCase())))),
    h("label", { class: "check" }, h("input", { type: "checkbox", name: "output", checked: output }), "output chunks"),
    h("button", { class: "btn primary", type: "submit" }, "Apply"));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const d = new FormData(form);
    const q = new URLSearchParams();
    for (const k of ["tenant", "task", "state"]) if (d.get(k)) q.set(k, String(d.get(k)).trim());
    if (d.get("output")) q.set("output", "1");
    location.hash = `#/events?${q}`;
  });
  const status = h("span", { class: "live-dot off" }, "live");
  const counter = h("span", { class: "muted" });
  const pause = h("label", { class: "check" }, h("input", { type: "checkbox" }), "pause");
  const body = h("tbody", {});
  fill(main, h("div", { class: "head" }, h("h1", {}, "Events"), status, counter, h("div", { class: "spacer" }), pause), form,
    h("div", { class: "card flush" }, h("table", { class: "grid feed" },
      h("thead", {}, h("tr", {}, ["Seq", "Time", "What", "Task", "State", "Node", "By", "Detail"].map((x) => h("th", {}, x)))), body)));

  let seen = 0;
  const held = [];
  const live = new LiveEvents({
    task_ids: task || undefined, tenant, output, states: state ? `TASK_STATE_${state}` : undefined,
  }, (batch, dropped) => {
    seen += batch.length + dropped;
    counter.textContent = `${seen.toLocaleString()} events`;
    held.push(...batch.slice(-KEEP));
    if (held.length > KEEP) held.splice(0, held.length - KEEP);
    if (pause.firstChild.checked) return;
    const rows = held.splice(0).reverse().map(row);
    body.prepend(...rows);
    while (body.childElementCount > KEEP) body.lastElementChild.remove();
  }, (s) => status.classList.toggle("off", s !== "live"));
  return () => live.close();
}

function row(e) {
  let what = "state";
  let detail = "";
  if (e.output) {
    what = "output";
    detail = e.output.data || "";
  } else if (e.breaker) {
    what = "breaker";
    detail = `${e.breaker.key || ""} ${String(e.breaker.state || "").replace("BREAKER_STATE_", "").toLowerCase()} ${e.breaker.lastError || ""}`;
  } else if (e.node) {
    what = "node";
    detail = `${e.node.nodeId || ""} ${e.node.throttled ? "throttled" : "calm"} ${e.node.reason || ""}`;
  } else if (e.quota) {
    what = "quota";
    detail = `${e.quota.key || ""} ${e.quota.limited ? "limited" : "passes"} ${e.quota.reason || ""}`;
  } else if (e.result) {
    detail = e.result.error || `exit ${e.result.exitCode || 0}`;
  }
  const t = e.time ? new Date(e.time) : null;
  return h("tr", { class: `ev-${what}` },
    h("td", { class: "mono muted" }, String(e.seq || "")),
    h("td", {}, t ? t.toLocaleTimeString(undefined, { hour12: false }) : ""),
    h("td", {}, what),
    h("td", {}, e.taskId ? h("a", { class: "mono", href: `#/tasks/${encodeURIComponent(e.taskId)}` }, e.taskId) : ""),
    h("td", {}, e.taskId && e.state ? badge(e.state) : ""),
    h("td", { class: "mono" }, e.nodeId || ""),
    h("td", {}, e.principal || ""),
    h("td", { class: "clip" }, detail.length > 300 ? `${detail.slice(0, 300)}…` : detail));
}
