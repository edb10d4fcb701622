// The dashboard's shell: who is logged in, the navigation, and hash routes (#/tasks/ID).

import { logout, whenUnauthenticated, whoami } from "./api.js";
import { action, fill, h } from "./dom.js";
import { renderLogin } from "./views/login.js";
import { renderOverview } from "./views/overview.js";
import { renderTasks } from "./views/tasks.js";
import { renderTask } from "./views/task.js";
import { renderNodes } from "./views/nodes.js";
import { renderEvents } from "./views/events.js";
import { renderSchedules, renderQuotas, renderTokens } from "./views/admin.js";

const VIEWS = [
  { path: "overview", title: "Overview", render: renderOverview, roles: ["admin", "submitter", "reader"] },
  { path: "tasks", title: "Tasks", render: renderTasks, roles: ["admin", "submitter", "reader"] },
  { path: "nodes", title: "Nodes", render: renderNodes, roles: ["admin", "reader"] },
  { path: "events", title: "Events", render: renderEvents, roles: ["admin", "submitter", "reader"] },
  { path: "schedules", title: "Schedules", render: renderSchedules, roles: ["admin"] },
  { path: "quotas", title: "Quotas & locks", render: renderQuotas, roles: ["admin"] },
  { path: "tokens", title: "Tokens", render: renderTokens, roles: ["admin"] },
];

const session = { me: null, cleanup: null };

function roleOf(me) {
  return String(me?.role || "").toLowerCase().replace(/^role_/, "");
}

/** What the current view needs to know of the caller: its role and what it may do. */
function caller() {
  const role = roleOf(session.me);
  return {
    role,
    tenant: session.me?.tenant || "",
    canSubmit: role === "admin" || role === "submitter",
    isAdmin: role === "admin",
  };
}

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query = ""] = raw.split("?");
  const parts = path.split("/").filter(Boolean).map((p) => {
    try {
      return decodeURIComponent(p);
    } catch {
      return p;
    }
  });
  return { parts, query: new URLSearchParams(query) };
}

function drawChrome() {
  const who = caller();
  const nav = document.getElementById("nav");
  const current = parseHash().parts[0] || "overview";
  fill(nav, session.me ? VIEWS.filter((v) => v.roles.includes(who.role)).map((v) =>
    h("a", { href: `#/${v.path}`, class: v.path === current ? "active" : "" }, v.title)) : []);
  const box = document.getElementById("who");
  if (!session.me) {
    fill(box);
    return;
  }
  fill(box,
    h("span", { class: "role" }, who.role || "?"),
    who.tenant ? h("span", { class: "tenant" }, who.tenant) : null,
    session.me.token_id ? action("Log out", async () => {
      await logout();
      session.me = null;
      route();
    }, { kind: "ghost small" }) : null);
}

async function route() {
  if (session.cleanup) {
    session.cleanup();
    session.cleanup = null;
  }
  const main = document.getElementById("view");
  if (!session.me) {
    try {
      session.me = await whoami();
    } catch {
      session.me = null;
    }
  }
  drawChrome();
  if (!session.me) {
    session.cleanup = renderLogin(main, async () => {
      session.me = await whoami();
      route();
    }) || null;
    return;
  }
  const { parts, query } = parseHash();
  const who = caller();
  let view = VIEWS.find((v) => v.path === (parts[0] || "overview"));
  if (!view || !view.roles.includes(who.role)) view = VIEWS.find((v) => v.roles.includes(who.role)) || VIEWS[0];
  const render = view.path === "tasks" && parts[1] ? renderTask : view.render;
  fill(main);
  document.title = `${view.title} · Shoal`;
  try {
    session.cleanup = render(main, { parts, query, caller: who }) || null;
  } catch (err) {
    fill(main, h("p", { class: "error" }, err.message));
  }
}

whenUnauthenticated(() => {
  if (session.me) {
    session.me = null;
    route();
  }
});
window.addEventListener("hashchange", route);
route();
