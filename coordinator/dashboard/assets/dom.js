// Building the page from data: every value goes in as text (textContent), never as markup.

/** An element: h("td", {class: "x", onclick: f}, "text", child, [more]). */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "value") el.value = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

/** Replace everything in `el` with `children`. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

const STATE_CLASS = {
  PENDING: "s-wait", QUEUED: "s-wait", ASSIGNED: "s-run", RUNNING: "s-run",
  SUCCEEDED: "s-ok", FAILED: "s-bad", CANCELLED: "s-off", TIMED_OUT: "s-bad", SKIPPED: "s-off",
};

/** TASK_STATE_SUCCEEDED -> SUCCEEDED (the JSON mapping names enums in full). */
export function stateName(state) {
  return String(state || "TASK_STATE_UNSPECIFIED").replace(/^TASK_STATE_/, "");
}

export function badge(state) {
  const name = stateName(state);
  return h("span", { class: `badge ${STATE_CLASS[name] || "s-off"}` }, name.toLowerCase().replace("_", " "));
}

export const FINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT", "SKIPPED"]);
export const STATES = ["PENDING", "QUEUED", "ASSIGNED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT", "SKIPPED"];
export const PRIORITIES = ["CRITICAL", "HIGH", "NORMAL", "LOW", "BACKGROUND"];

export function priorityName(p) {
  const name = String(p || "PRIORITY_NORMAL").replace(/^PRIORITY_/, "");
  return name === "UNSPECIFIED" ? "NORMAL" : name;
}

export function when(ts) {
  if (!ts) return "";
  const d = new Date(ts);
  if (Number.isNaN(d.getTime())) return String(ts);
  return d.toLocaleString(undefined, { hour12: false });
}

export function ago(ts) {
  if (!ts) return "";
  const s = (Date.now() - new Date(ts).getTime()) / 1000;
  if (!Number.isFinite(s)) return "";
  if (s < 1) return "just now";
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export function took(start, end) {
  if (!start) return "";
  const ms = (end ? new Date(end) : new Date()).getTime() - new Date(start).getTime();
  if (!Number.isFinite(ms) || ms < 0) return "";
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
}

export function num(n) {
  const v = Number(n || 0);
  return v.toLocaleString(undefined, { maximumFractionDigits: v < 10 ? 2 : 0 });
}

/** The executor of a spec: its kind's field name (shell, python, ...) or a custom one's. */
export function kindOf(spec) {
  if (!spec) return "";
  for (const k of ["shell", "python", "docker", "ollama", "llm", "http", "tool"]) if (spec[k]) return k;
  if (spec.custom) return spec.custom.executor || "custom";
  return "";
}

/** A one-line description of what a spec runs. */
export function summary(spec) {
  if (!spec) return "";
  if (spec.name) return spec.name;
  const s = spec.shell;
  if (s) return s.script || (s.argv || []).join(" ");
  if (spec.python) return (spec.python.code || "").split("\n")[0];
  if (spec.docker) return spec.docker.image || "";
  if (spec.llm) return `${spec.llm.provider || ""} ${spec.llm.model || ""}`.trim();
  if (spec.ollama) return spec.ollama.model || "";
  if (spec.http) return `${spec.http.method || "GET"} ${spec.http.url || ""}`;
  if (spec.tool) return spec.tool.name || "";
  return "";
}

export function toast(message, kind = "info") {
  const box = document.getElementById("toasts");
  const el = h("div", { class: `toast ${kind}`, role: kind === "error" ? "alert" : "status" }, message);
  box.appendChild(el);
  setTimeout(() => el.remove(), kind === "error" ? 8000 : 4000);
}

/** An async action behind a button: disabled while it runs, its error shown. */
export function action(label, fn, { kind = "", confirmText = "" } = {}) {
  const btn = h("button", { class: `btn ${kind}`, type: "button" }, label);
  btn.addEventListener("click", async () => {
    if (confirmText && !window.confirm(confirmText)) return;
    btn.disabled = true;
    try {
      await fn();
    } catch (err) {
      toast(err.message, "error");
    } finally {
      btn.disabled = false;
    }
  });
  return btn;
}

export function table(headers, rows, { empty = "Nothing here yet." } = {}) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h("table", { class: "grid" },
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows));
}

export function kv(pairs) {
  return h("dl", { class: "kv" }, pairs.filter(([, v]) => v !== undefined && v !== null && v !== "")
    .map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

export function chips(map) {
  return Object.entries(map || {}).map(([k, v]) => h("span", { class: "chip" }, v === "" ? k : `${k}=${v}`));
}
