// Live time-series charts (uPlot), sized to their box, fed a point at a time.

import uPlot from "./vendor/uplot/uPlot.esm.js";
import { h } from "./dom.js";

const KEEP = 300; // points: five minutes at one a second

export const COLORS = {
  SUCCEEDED: "#22c55e", FAILED: "#ef4444", TIMED_OUT: "#f97316", CANCELLED: "#94a3b8", SKIPPED: "#a78bfa",
  CRITICAL: "#ef4444", HIGH: "#f97316", NORMAL: "#3b82f6", LOW: "#14b8a6", BACKGROUND: "#94a3b8",
  running: "#3b82f6", free: "#22c55e", queued: "#f59e0b",
};

/** A chart of `series` names over time; `push(t, values)` adds a point (seconds, numbers). */
export class LiveChart {
  constructor(title, series, { unit = "" } = {}) {
    this.names = series;
    this.data = [[], ...series.map(() => [])];
    this.box = h("div", { class: "chart-box" });
    this.el = h("section", { class: "card chart" }, h("h3", {}, title), this.box);
    this.unit = unit;
    this.plot = null;
    this.resize = new ResizeObserver(() => this.fit());
    this.resize.observe(this.box);
  }

  make(width) {
    const axis = { stroke: "#8b95a7", grid: { stroke: "rgba(139,149,167,0.15)" }, ticks: { stroke: "rgba(139,149,167,0.25)" } };
    const unit = this.unit;
    this.plot = new uPlot({
      width,
      height: 190,
      legend: { live: false },
      cursor: { drag: { x: false, y: false } },
      scales: { y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
      axes: [{ ...axis, space: 70, values: (u, vals) => vals.map(clock) }, { ...axis, size: 50, values: (u, vals) => vals.map((v) => `${fmt(v)}${unit}`) }],
      series: [{}, ...this.names.map((name) => ({
        label: name.toLowerCase().replace("_", " "),
        stroke: COLORS[name] || "#3b82f6",
        fill: `${COLORS[name] || "#3b82f6"}22`,
        width: 2,
        points: { show: false },
      }))],
    }, this.data, this.box);
  }

  fit() {
    const width = Math.max(200, Math.floor(this.box.getBoundingClientRect().width));
    if (!this.plot) this.make(width);
    else if (Math.abs(this.plot.width - width) > 2) this.plot.setSize({ width, height: 190 });
  }

  push(t, values) {
    this.data[0].push(t);
    this.names.forEach((name, i) => this.data[i + 1].push(values[name] ?? 0));
    if (this.data[0].length > KEEP) for (const col of this.data) col.shift();
    this.el.dataset.points = String(this.data[0].length);
    if (this.plot) this.plot.setData(this.data);
  }

  destroy() {
    this.resize.disconnect();
    if (this.plot) this.plot.destroy();
  }
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString(undefined, { hour12: false });
}

function fmt(v) {
  if (Math.abs(v) >= 1e6) return `${(v / 1e6).toFixed(1)}M`;
  if (Math.abs(v) >= 1e3) return `${(v / 1e3).toFixed(1)}k`;
  return Number.isInteger(v) ? String(v) : v.toFixed(1);
}
