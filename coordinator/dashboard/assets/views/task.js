// One task: spec, attempts, upstream graph, why it waits, live output, usage; cancel.

import { call } from "../api.js";
import { LiveEvents } from "../live.js";
import { action, badge, chips, FINAL, fill, h, kindOf, kv, num, priorityName, stateName, summary, table, toast, took, when } from "../dom.js";

const MAX_OUTPUT = 1 << 20; // characters of output kept on the page (the tail)
const MAX_UPSTREAM = 20;

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
      task = await call("Tasks", "Get", { taskId: id });
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
    const ups = (task.dependsOn || []).slice(0, MAX_UPSTREAM);
    const node = (t, tid) => h("a", { class: "gnode", href: `#/tasks/${encodeURIComponent(tid)}` },
      t ? badge(t.state) : null, h("span", { class: "mono" }, tid), t ? h("span", { class: "muted" }, summary(t.spec)) : null);
    const self = h("div", { class: "gnode self" }, badge(task.state), h("span", { class: "mono" }, task.id));
    const upBox = h("div", { class: "gcol" });
    fill(graph, h("h3", {}, "Dependencies"), ups.length
      ? h("div", { class: "graph" }, upBox, h("div", { class: "garrow", title: "upstream before this task" }, "↓"), h("div", { class: "gcol" }, self))
      : h("p", { class: "empty" }, "No upstream tasks."),
      (task.dependsOn || []).length > MAX_UPSTREAM ? h("p", { class: "muted" }, `and ${task.dependsOn.length - MAX_UPSTREAM} more upstream`) : null);
    const found = await Promise.all(ups.map((u) => call("Tasks", "Get", { taskId: u }).catch(() => null)));
    if (!stopped) fill(upBox, ups.map((u, i) => node(found[i], u)));
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
