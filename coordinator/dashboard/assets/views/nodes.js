// Nodes: health, load, slots, executors, models, the resource guard, breakers; drain/undrain.

import { call } from "../api.js";
import { action, ago, chips, fill, h, num, priorityName, toast } from "../dom.js";

const POLL_MS = 2000;

function health(n) {
  if (!n.connected) return ["offline", "s-off"];
  if (n.draining) return ["draining", "s-wait"];
  if ((n.breakers || []).some((b) => b.state === "BREAKER_STATE_OPEN")) return ["breaker open", "s-bad"];
  if (n.throttledByLoad) return ["throttled", "s-wait"];
  if (n.health === "NODE_HEALTH_NOT_SERVING") return ["not serving", "s-bad"];
  return ["healthy", "s-ok"];
}

export function renderNodes(main, { caller }) {
  const list = h("div", { class: "nodes" });
  fill(main, h("div", { class: "head" }, h("h1", {}, "Nodes"), h("span", { class: "live-dot" }, "live")), list);
  let stopped = false;

  async function load() {
    let res;
    try {
      res = await call("Admin", "ListNodes", {});
    } catch (err) {
      fill(list, h("p", { class: "error" }, err.message));
      return;
    }
    if (stopped) return;
    const nodes = res.nodes || [];
    fill(list, nodes.length ? nodes.map((n) => card(n)) : h("p", { class: "empty card" }, "No nodes have connected."));
  }

  function card(n) {
    const info = n.info || {};
    const slots = Number(info.slots || 0);
    const running = Number(n.running || 0);
    const [label, cls] = health(n);
    const meter = h("div", { class: "meter" }, h("span", {}));
    meter.firstChild.style.width = `${slots ? Math.min(100, (100 * running) / slots) : 0}%`;
    const models = [...new Set([...(info.models || []), ...(info.ollamaModels || [])])];
    const breakers = (n.breakers || []).filter((b) => b.state && b.state !== "BREAKER_STATE_CLOSED");
    return h("section", { class: "card node", dataset: { node: info.nodeId || "" } },
      h("div", { class: "card-head" },
        h("h3", { class: "mono" }, info.nodeId || "?"), h("span", { class: `badge ${cls}` }, label),
        h("span", { class: "muted" }, info.hostname || "", n.address ? ` · ${n.address}` : ""),
        h("div", { class: "spacer" }),
        caller.isAdmin && n.connected ? (n.draining
          ? action("Undrain", async () => { await call("Admin", "Undrain", { nodeId: info.nodeId }); toast(`${info.nodeId} takes work again`); load(); })
          : action("Drain", async () => { await call("Admin", "Drain", { nodeId: info.nodeId }); toast(`${info.nodeId} drains`); load(); },
            { kind: "danger", confirmText: `Drain ${info.nodeId}? It takes no new work.` })) : null),
      h("div", { class: "load" }, h("span", {}, `${num(running)} running of ${num(slots)} slots`), meter,
        h("span", { class: "muted" }, `${num(n.freeSlots)} free`)),
      h("dl", { class: "kv compact" },
        h("dt", {}, "Executors"), h("dd", {}, (info.executors || []).map((x) => h("span", { class: "chip" }, x))),
        models.length ? [h("dt", {}, "Models"), h("dd", {}, models.map((x) => h("span", { class: "chip" }, x)))] : null,
        Object.keys(info.labels || {}).length ? [h("dt", {}, "Labels"), h("dd", {}, chips(info.labels))] : null,
        h("dt", {}, "Machine"), h("dd", {}, `${num(info.resources?.cpus)} CPUs · ${num(Number(info.resources?.memoryMb || 0) / 1024)} GB`,
          info.resources?.gpus ? ` · ${info.resources.gpus} GPUs` : "", info.version ? ` · shoal ${info.version}` : ""),
        h("dt", {}, "Guard"), h("dd", {}, n.throttledByLoad
          ? `takes only ${priorityName(n.minPriority).toLowerCase()} and above; ${num(n.paused)} paused — ${n.throttleReason || ""}`
          : "calm"),
        h("dt", {}, "Seen"), h("dd", {}, n.connected ? `connected ${ago(n.connectedAt)}, last heard ${ago(n.lastSeen)}` : `last heard ${ago(n.lastSeen)}`),
        breakers.length ? [h("dt", {}, "Breakers"), h("dd", {}, breakers.map((b) =>
          h("div", { class: "breaker" }, h("code", {}, b.key || ""), " ", b.state.replace("BREAKER_STATE_", "").toLowerCase(),
            ` after ${num(b.failures)} failures: `, b.lastError || "")))] : null));
  }

  load();
  const timer = setInterval(load, POLL_MS);
  return () => {
    stopped = true;
    clearInterval(timer);
  };
}
