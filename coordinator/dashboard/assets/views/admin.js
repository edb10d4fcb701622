// Admin views: schedules (run now, pause, resume), quotas with usage, locks held, tokens.

import { call } from "../api.js";
import { action, ago, fill, h, num, summary, table, toast, when } from "../dom.js";

export function renderSchedules(main) {
  const body = h("div", { class: "card flush" });
  fill(main, h("div", { class: "head" }, h("h1", {}, "Schedules")), body);
  async function load() {
    try {
      const res = await call("Admin", "ListSchedules", {});
      const rows = (res.schedules || []).map((s) => h("tr", {},
        h("td", {}, h("strong", {}, s.name || "")),
        h("td", { class: "mono" }, s.cron || (s.every ? `every ${s.every}` : "")),
        h("td", { class: "clip" }, summary(s.spec)),
        h("td", {}, s.paused ? h("span", { class: "badge s-off" }, "paused") : h("span", { class: "badge s-ok" }, "active")),
        h("td", {}, s.paused ? "" : when(s.nextRun)),
        h("td", {}, s.lastTaskId ? h("a", { class: "mono", href: `#/tasks/${encodeURIComponent(s.lastTaskId)}` }, ago(s.lastRun)) : ""),
        h("td", {}, num(s.runs), Number(s.skipped) ? ` (${num(s.skipped)} skipped)` : ""),
        h("td", {},
          action("Run now", async () => { const r = await call("Admin", "RunSchedule", { name: s.name }); toast(`${s.name} run submitted: ${r.lastTaskId || ""}`); load(); }),
          " ",
          s.paused
            ? action("Resume", async () => { await call("Admin", "ResumeSchedule", { name: s.name }); toast(`${s.name} resumed`); load(); })
            : action("Pause", async () => { await call("Admin", "PauseSchedule", { name: s.name }); toast(`${s.name} paused`); load(); }))));
      fill(body, table(["Name", "When", "Task", "State", "Next run", "Last run", "Runs", ""], rows, { empty: "No schedules. Create one with `shoal schedule create`." }));
    } catch (err) {
      fill(body, h("p", { class: "error" }, err.message));
    }
  }
  load();
  const timer = setInterval(load, 5000);
  return () => clearInterval(timer);
}

function gauge(used, limit) {
  if (!limit) return h("span", { class: "muted" }, num(used));
  const bar = h("div", { class: "meter small" }, h("span", {}));
  const share = Math.min(100, (100 * used) / limit);
  bar.firstChild.style.width = `${share}%`;
  if (share >= 90) bar.classList.add("hot");
  return h("div", { class: "gauge" }, bar, h("span", {}, `${num(used)} / ${num(limit)}`));
}

export function renderQuotas(main) {
  const quotas = h("div", { class: "card flush" });
  const locks = h("section", { class: "card" });
  const field = (name, label, attrs = {}) => h("label", { class: "field" }, h("span", {}, label), h("input", { name, ...attrs }));
  const form = h("form", { class: "filters card row" },
    field("key", "Key", { required: true, placeholder: "team:ml" }),
    field("rate", "Tasks per second", { type: "number", min: "0", step: "any" }),
    field("concurrency", "Concurrency", { type: "number", min: "0", step: "1" }),
    field("requestsPerDay", "Requests per day", { type: "number", min: "0", step: "1" }),
    field("costPerDay", "Dollars per day", { type: "number", min: "0", step: "any" }),
    h("button", { class: "btn primary", type: "submit" }, "Set quota"));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const d = new FormData(form);
    const body = { key: String(d.get("key")).trim() };
    for (const k of ["rate", "concurrency", "requestsPerDay", "costPerDay"]) {
      const v = String(d.get(k) || "").trim();
      if (v) body[k] = Number(v);
    }
    try {
      await call("Admin", "SetQuota", body);
      toast(`Quota on ${body.key} set`);
      form.reset();
      load();
    } catch (err) {
      toast(err.message, "error");
    }
  });
  fill(main, h("div", { class: "head" }, h("h1", {}, "Quotas, usage and locks")), form, quotas, locks);
  let stopped = false;
  async function load() {
    try {
      const [q, u, ov] = await Promise.all([
        call("Admin", "ListQuotas", {}), call("Admin", "GetUsage", {}), call("Admin", "GetOverview", {}),
      ]);
      if (stopped) return;
      const day = new Date().toISOString().slice(0, 10);
      const usage = {};
      for (const k of u.usage || []) if (k.period === day || !usage[k.key]) usage[k.key] = k;
      const limits = Object.fromEntries((q.quotas || []).map((x) => [x.key, x]));
      const held = ov.held || {};
      const keys = [...new Set([...Object.keys(limits), ...Object.keys(usage)])].sort();
      const rows = keys.map((key) => {
        const l = limits[key] || {};
        const k = usage[key] || {};
        return h("tr", {},
          h("td", {}, h("code", {}, key)),
          h("td", {}, l.rate ? `${num(l.rate)} per ${l.per || "1s"}` : ""),
          h("td", {}, gauge(Number(k.running || 0), Number(l.concurrency || 0))),
          h("td", {}, gauge(Number(k.requests || 0), Number(l.requestsPerDay || 0))),
          h("td", {}, gauge(Number(k.tokens || 0), Number(l.tokensPerDay || 0))),
          h("td", {}, `$${Number(k.cost || 0).toFixed(2)}`, l.costPerDay ? ` / $${Number(l.costPerDay).toFixed(2)}` : ""),
          h("td", {}, num(held[`quota:${key}`] || 0)),
          h("td", {}, limits[key] ? action("Delete", async () => { await call("Admin", "DeleteQuota", { key }); toast(`Quota ${key} deleted`); load(); },
            { kind: "ghost small", confirmText: `Delete the quota on ${key}?` }) : ""));
      });
      fill(quotas, table(["Key", "Rate", "Running / concurrency", "Requests today", "Tokens today", "Cost today", "Held", ""], rows,
        { empty: "No quotas or usage yet." }));
      const lockKeys = Object.entries(held).filter(([k]) => k.startsWith("lock:"));
      fill(locks, h("h3", {}, "Locks with tasks waiting"), lockKeys.length
        ? h("ul", { class: "plain" }, lockKeys.map(([k, n]) => h("li", {}, h("code", {}, k.slice(5)), h("span", { class: "muted" }, ` ${num(n)} waiting`))))
        : h("p", { class: "empty" }, "No task waits for a lock."));
    } catch (err) {
      fill(quotas, h("p", { class: "error" }, err.message));
    }
  }
  load();
  const timer = setInterval(load, 3000);
  return () => {
    stopped = true;
    clearInterval(timer);
  };
}

const ROLES = ["ROLE_READER", "ROLE_SUBMITTER", "ROLE_ADMIN", "ROLE_NODE"];

export function renderTokens(main) {
  const body = h("div", { class: "card flush" });
  const made = h("div", {});
  const form = h("form", { class: "filters card row" },
    h("label", { class: "field" }, h("span", {}, "Name"), h("input", { name: "name", required: true })),
    h("label", { class: "field" }, h("span", {}, "Role"), h("select", { name: "role" }, ROLES.map((r) => h("option", { value: r }, r.slice(5).toLowerCase())))),
    h("label", { class: "field" }, h("span", {}, "Tenant"), h("input", { name: "tenant" })),
    h("button", { class: "btn primary", type: "submit" }, "Create token"));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const d = new FormData(form);
    try {
      const res = await call("Admin", "CreateToken", { name: String(d.get("name")).trim(), role: d.get("role"), tenant: String(d.get("tenant") || "").trim() });
      fill(made, h("div", { class: "card notice" }, h("strong", {}, "New token — shown only now: "), h("code", { class: "secret" }, res.token || "")));
      form.reset();
      load();
    } catch (err) {
      toast(err.message, "error");
    }
  });
  fill(main, h("div", { class: "head" }, h("h1", {}, "Tokens")), form, made, body);
  async function load() {
    try {
      const res = await call("Admin", "ListTokens", { includeRevoked: true });
      const rows = (res.tokens || []).map((t) => h("tr", { class: t.revokedAt ? "revoked" : "" },
        h("td", {}, h("strong", {}, t.name || "")), h("td", { class: "mono" }, t.id || ""),
        h("td", {}, String(t.role || "").replace("ROLE_", "").toLowerCase()), h("td", {}, t.tenant || ""),
        h("td", {}, when(t.createdAt)), h("td", {}, t.expiresAt ? when(t.expiresAt) : "never"),
        h("td", {}, t.revokedAt ? `revoked ${ago(t.revokedAt)}` : action("Revoke", async () => {
          await call("Admin", "RevokeToken", { token: t.id });
          toast(`${t.name} revoked`);
          load();
        }, { kind: "danger small", confirmText: `Revoke ${t.name}? Calls made with it fail from now on.` }))));
      fill(body, table(["Name", "Id", "Role", "Tenant", "Created", "Expires", ""], rows));
    } catch (err) {
      fill(body, h("p", { class: "error" }, err.message));
    }
  }
  load();
}
