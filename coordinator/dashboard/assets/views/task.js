// One task: spec, attempts, dependency graph (upstream and downstream), why it waits, live output, usage; cancel.

import { call } from "../api.js";
import { LiveEvents } from "../live.js";
import { action, badge, chips, FINAL, fill, h, kindOf, kv, num, priorityName, stateName, summary, table, toast, took, when } from "../dom.js";

const MAX_OUTPUT = 1 << 20; // characters of output kept on the page (the tail)
const MAX_NEIGHBOURS = 20; // tasks drawn on each side of the graph

export function renderTask(main, { parts, caller }) {
  const id = parts[1];
  const head = h("div", { class: "head" });
  const facts = h("section", { class: "card" });
  const waits = h("section", { class: "card", hidden: true });
  const graph = h("section", { class: "card" }, h("h3", {}, "Dependencies"));
  const attempts = h("section", { class: "card" }, h("h3", {}, "Attempts"));
  const usage = h("section", { class: "card" }, h("h3", {}, "Usage and cost"));
  const out = h("pre", { class: "output", id: "output", "aria-live": "off" });
  const outStatus = h("span", { class: "live-dot off" }, "live");
  const spec = h("pre", { class: "spec" });
  fill(main, head,
    h("div", { class: "split" },
      h("div", {}, facts, waits, graph, usage),
      h("div", {}, h("section", { class: "card" }, h("div", { class: "card-head" }, h("h3", {}, "Output"), outStatus), out), attempts,
        h("section", { class: "card" }, h("details", {}, h("summary", {}, "Spec (JSON)"), spec)))));

  let task = null;
  let stopped = false;
  let output = "";
  let events = null;

  async function load() {
    try {
      task = await call("Tasks", "Get", { taskId: id, includeDependents: true });
    } catch (err) {
      fill(head, h("h1", {}, "Task ", h("span", { class: "mono" }, id)));
      fill(facts, h("p", { class: "error" }, err.message));
      return;
    }
    if (stopped) return;
    draw();
    // A finished task's output is its result's; a live one's streams in from the events.
    if (!events && !FINAL.has(stateName(task.state))) follow();
  }

  function draw() {
    const state = stateName(task.state);
    const s = task.spec || {};
    fill(head,
      h("a", { href: "#/tasks", class: "back" }, "← Tasks"),
      h("h1", {}, s.name || "Task"), h("span", { class: "mono muted", id: "task-id" }, task.id), badge(task.state),
      h("div", { class: "spacer" }),
      caller.canSubmit && !FINAL.has(state) ? action("Cancel task", async () => {
        task = await call("Tasks", "Cancel", { taskId: task.id });
        toast(`Cancelling ${task.id}`);
        draw();
        // A running task ends once its node has killed it: wait for that (briefly).
        if (!FINAL.has(stateName(task.state))) {
          task = await call("Tasks", "Wait", { taskId: task.id, timeout: "10s" });
          if (!stopped) draw();
        }
      }, { kind: "danger", confirmText: "Cancel this task?" }) : null);
    fill(facts, h("h3", {}, "Task"), kv([
      ["State", badge(task.state)],
      ["What", summary(s)],
      ["Executor", kindOf(s)],
      ["Tenant", s.tenant],
      ["Priority", priorityName(s.priority).toLowerCase()],
      ["Node", task.nodeId ? h("a", { href: "#/nodes", class: "mono" }, task.nodeId) : ""],
      ["Attempt", task.attempt ? `${task.attempt.number || 0} (epoch ${task.attempt.epoch || 0})` : ""],
      ["Submitted by", task.submittedBy],
      ["Created", when(task.createdAt)],
      ["Started", when(task.startedAt)],
      ["Finished", when(task.finishedAt)],
      ["Took", took(task.startedAt, task.finishedAt)],
      ["Exit code", task.result && FINAL.has(state) ? String(task.result.exitCode || 0) : ""],
      ["Error", task.result?.error],
      ["Labels", Object.keys(s.requiredLabels || {}).length ? h("span", {}, chips(s.requiredLabels)) : ""],
      ["Metadata", Object.keys(s.metadata || {}).length ? h("span", {}, chips(s.metadata)) : ""],
    ]));
    waits.hidden = !task.pendingReason;
    fill(waits, h("h3", {}, "Why it waits"), h("p", { class: "reason" }, task.pendingReason || ""));
    drawGraph();
    drawAttempts();
    const u = task.result?.usage;
    fill(usage, h("h3", {}, "Usage and cost"), u ? kv([
      ["Model", u.model],
      ["Prompt tokens", num(u.promptTokens)],
      ["Completion tokens", num(u.completionTokens)],
      ["Cost", `$${Number(u.cost || 0).toFixed(4)}`],
    ]) : h("p", { class: "empty" }, "No usage reported."));
    spec.textContent = JSON.stringify(s, null, 2);
    if (FINAL.has(state)) {
      if (!events) setOutput(finalOutput(task.result));
      else {
        events.close(); // its output is complete: nothing more will come
      }
      outStatus.textContent = "final";
      outStatus.classList.add("off");
    }
  }

  function drawAttempts() {
    const rows = [...(task.attempts || []), ...(task.attempt ? [{ id: task.attempt, nodeId: task.nodeId, state: task.state, startedAt: task.startedAt, finishedAt: task.finishedAt, result: task.result }] : [])]
      .map((a) => h("tr", {},
        h("td", {}, String(a.id?.number || "")),
        h("td", { class: "mono" }, a.nodeId || ""),
        h("td", {}, badge(a.state)),
        h("td", {}, when(a.startedAt)),
        h("td", {}, took(a.startedAt, a.finishedAt)),
        h("td", { class: "clip" }, a.result?.error || "")));
    fill(attempts, h("h3", {}, "Attempts"), table(["#", "Node", "State", "Started", "Took", "Error"], rows, { empty: "Not dispatched yet." }));
  }

  async function drawGraph() {
    const all = { up: task.dependsOn || [], down: task.dependents || [] };
    if (!all.up.length && !all.down.length) {
      fill(graph, h("h3", {}, "Dependencies"), h("p", { class: "empty" }, "No upstream or downstream tasks."));
      return;
    }
    const node = (t, tid) => h("a", { class: "gnode", href: `#/tasks/${encodeURIComponent(tid)}`, dataset: { id: tid } },
      t ? badge(t.state) : null, h("span", { class: "mono" }, tid), t ? h("span", { class: "muted" }, summary(t.spec)) : null);
    const column = (ids, side, more) => h("div", { class: `gcol ${side}` }, ids.map((tid) => node(null, tid)),
      more > 0 ? h("p", { class: "muted" }, `and ${more}${side === "down" && all.down.length >= 1000 ? "+" : ""} more`) : null);
    const shown = { up: all.up.slice(0, MAX_NEIGHBOURS), down: all.down.slice(0, MAX_NEIGHBOURS) };
    const cols = {
      up: column(shown.up, "up", all.up.length - shown.up.length),
      down: column(shown.down, "down", all.down.length - shown.down.length),
    };
    const self = h("div", { class: "gcol" }, h("div", { class: "gnode self" }, badge(task.state), h("span", { class: "mono" }, task.id)));
    const arrow = (title) => h("div", { class: "garrow", title }, "↓");
    fill(graph, h("h3", {}, "Dependencies"),
      h("div", { class: "graph", id: "graph" },
        h("div", { class: "gside" }, h("span", { class: "muted" }, `Upstream (${all.up.length})`), all.up.length ? cols.up : h("p", { class: "empty" }, "none")),
        arrow("upstream runs before this task"), self, arrow("downstream runs after this task"),
        h("div", { class: "gside" }, h("span", { class: "muted" }, `Downstream (${all.down.length}${all.down.length >= 1000 ? "+" : ""})`), all.down.length ? cols.down : h("p", { class: "empty" }, "none"))));
    // Each neighbour's state and summary, once fetched (a missing or hidden one stays an id).
    for (const side of ["up", "down"]) {
      const found = await Promise.all(shown[side].map((u) => call("Tasks", "Get", { taskId: u }).catch(() => null)));
      if (stopped) return;
      fill(cols[side], shown[side].map((u, i) => node(found[i], u)),
        all[side].length > shown[side].length ? h("p", { class: "muted" }, `and ${all[side].length - shown[side].length} more`) : null);
    }
  }

  function setOutput(text) {
    output = text.length > MAX_OUTPUT ? text.slice(-MAX_OUTPUT) : text;
    out.textContent = output || "";
    if (!output) out.classList.add("empty-out");
    else out.classList.remove("empty-out");
  }

  function follow() {
    // From just before the task's first event: its output so far replays, then follows live.
    const since = task.createdSeq ? String(BigInt(task.createdSeq) - 1n) : undefined;
    let chunks = "";
    events = new LiveEvents({ since, task_ids: id, output: true }, (batch) => {
      let changed = false;
      for (const e of batch) {
        if (e.output) chunks += e.output.data || "";
        else changed = true;
      }
      if (chunks) {
        setOutput(output + chunks);
        chunks = "";
        out.scrollTop = out.scrollHeight;
      }
      if (changed) load();
    }, (status) => {
      if (outStatus.textContent === "live") outStatus.classList.toggle("off", status !== "live");
    });
  }

  load();
  return () => {
    stopped = true;
    if (events) events.close();
  };
}

function finalOutput(result) {
  if (!result) return "";
  const parts = [result.stdout || ""];
  if (result.stderr) parts.push(result.stderr);
  return parts.join("");
}
