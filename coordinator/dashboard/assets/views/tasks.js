// Tasks: filtered, paged through List's page token, searchable by id, refreshed live.

import { call } from "../api.js";
import { ago, badge, chips, fill, h, kindOf, priorityName, STATES, summary, table, took } from "../dom.js";

const PAGE = 50;
const REFRESH_MS = 1000;

/** Filters live in the hash (#/tasks?state=FAILED&tenant=x) so a filtered list is linkable. */
function filtersOf(query) {
  return {
    states: query.getAll("state").filter((s) => STATES.includes(s)),
    tenant: query.get("tenant") || "",
    executor: query.get("executor") || "",
    label: query.get("label") || "",
    after: query.get("after") || "",
    before: query.get("before") || "",
  };
}

function hashOf(f) {
  const q = new URLSearchParams();
  for (const s of f.states) q.append("state", s);
  for (const k of ["tenant", "executor", "label", "after", "before"]) if (f[k]) q.set(k, f[k]);
  const s = q.toString();
  return s ? `#/tasks?${s}` : "#/tasks";
}

/** The List request of filters `f`: every filter is applied by the coordinator's query.
 * Labels are "key=value" entries, comma-separated; a malformed one throws. */
function listRequest(f) {
  const labels = {};
  for (const part of f.label.split(",").map((p) => p.trim()).filter(Boolean)) {
    const at = part.indexOf("=");
    if (at < 1) throw new Error(`Label filter "${part}": write key=value`);
    labels[part.slice(0, at).trim()] = part.slice(at + 1).trim();
  }
  const time = (v, name) => {
    const t = new Date(v);
    if (Number.isNaN(t.getTime())) throw new Error(`${name}: not a date and time`);
    return t.toISOString();
  };
  const req = { states: f.states.map((s) => `TASK_STATE_${s}`), tenant: f.tenant, executor: f.executor, labels };
  if (f.after) req.createdAfter = time(f.after, "Created after");
  if (f.before) req.createdBefore = time(f.before, "Created before");
  return req;
}

export function renderTasks(main, { query }) {
  const f = filtersOf(query);
  const tokens = [""]; // page tokens of the pages seen, to go back
  let page = 0;
  let next = "";
  let stopped = false;

  const body = h("div", { class: "card flush" });
  const pager = h("div", { class: "pager" });
  const search = h("input", { type: "search", placeholder: "Open a task by id", "aria-label": "Task id", id: "task-search" });
  const searchForm = h("form", { class: "search" }, search, h("button", { class: "btn", type: "submit" }, "Open"));
  searchForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const id = search.value.trim();
    if (id) location.hash = `#/tasks/${encodeURIComponent(id)}`;
  });

  const stateBoxes = STATES.map((s) => h("label", { class: "check" },
    h("input", { type: "checkbox", value: s, checked: f.states.includes(s) }), s.toLowerCase().replace("_", " ")));
  const field = (name, label, attrs = {}) => h("label", { class: "field" }, h("span", {}, label),
    h("input", { name, value: f[name], ...attrs }));
  const form = h("form", { class: "filters card" },
    h("div", { class: "states" }, stateBoxes),
    h("div", { class: "row" },
      field("tenant", "Tenant"),
      field("executor", "Executor", { list: "executors", placeholder: "shell, python, …" }),
      field("label", "Labels", { placeholder: "key=value, …" }),
      field("after", "Created after", { type: "datetime-local" }),
      field("before", "Created before", { type: "datetime-local" }),
      h("button", { class: "btn primary", type: "submit" }, "Apply"),
      h("a", { class: "btn ghost", href: "#/tasks" }, "Clear")),
    h("datalist", { id: "executors" }, ["shell", "python", "docker", "ollama", "llm", "http", "tool"].map((x) => h("option", { value: x }))));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const data = new FormData(form);
    location.hash = hashOf({
      states: stateBoxes.map((l) => l.firstChild).filter((c) => c.checked).map((c) => c.value),
      tenant: String(data.get("tenant") || "").trim(),
      executor: String(data.get("executor") || "").trim(),
      label: String(data.get("label") || "").trim(),
      after: String(data.get("after") || ""),
      before: String(data.get("before") || ""),
    });
  });

  const live = h("span", { class: "live-dot off" }, "live");
  fill(main, h("div", { class: "head" }, h("h1", {}, "Tasks"), live, searchForm), form, body, pager);

  async function load() {
    let res;
    try {
      res = await call("Tasks", "List", { ...listRequest(f), limit: PAGE, pageToken: tokens[page] });
    } catch (err) {
      fill(body, h("p", { class: "error" }, err.message));
      return;
    }
    if (stopped) return;
    next = res.nextPageToken || "";
    const tasks = res.tasks || [];
    const rows = tasks.map((t) => h("tr", { dataset: { id: t.id || "" } },
      h("td", {}, h("a", { href: `#/tasks/${encodeURIComponent(t.id || "")}`, class: "mono" }, t.id || "")),
      h("td", {}, badge(t.state)),
      h("td", { class: "clip" }, summary(t.spec), " ", chips(t.spec?.requiredLabels)),
      h("td", {}, kindOf(t.spec)),
      h("td", {}, t.spec?.tenant || ""),
      h("td", {}, priorityName(t.spec?.priority).toLowerCase()),
      h("td", { class: "mono" }, t.nodeId || ""),
      h("td", { title: t.createdAt || "" }, ago(t.createdAt)),
      h("td", {}, took(t.startedAt, t.finishedAt))));
    fill(body, table(["Id", "State", "What", "Executor", "Tenant", "Priority", "Node", "Created", "Took"], rows,
      { empty: "No tasks." }));
    fill(pager,
      h("button", { class: "btn", type: "button", disabled: page === 0, onclick: () => { page -= 1; load(); } }, "← Newer"),
      h("span", { class: "muted" }, `Page ${page + 1}`),
      h("button", { class: "btn", type: "button", disabled: !next, onclick: () => { tokens[page + 1] = next; page += 1; load(); } }, "Older →"));
  }

  // Live: the first page is listed again, at most once a second, when the mesh's newest event
  // changed. One cheap counter read a second instead of a stream of every event, which at
  // thousands of tasks a second would cost the coordinator more than the page needs.
  let lastSeq = null;
  const timer = setInterval(async () => {
    if (page !== 0 || stopped) return;
    try {
      const ov = await call("Admin", "GetOverview", {});
      live.classList.remove("off");
      if (ov.lastSeq !== lastSeq) {
        lastSeq = ov.lastSeq;
        await load();
      }
    } catch {
      live.classList.add("off");
    }
  }, REFRESH_MS);
  load();
  return () => {
    stopped = true;
    clearInterval(timer);
  };
}
