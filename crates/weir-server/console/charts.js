// Charts of the last minutes, fed one sample a second from the live overview: a line chart
// with axes and a legend, and a sparkline (no axes) for a table cell. uPlot draws them.

import uPlot from "./vendor/uPlot.esm.js";

/** Samples kept: five minutes at one a second. */
export const WINDOW = 300;

/** A time series of one or more values, at most `WINDOW` samples. */
export class Series {
  constructor(count) {
    this.data = [[], ...Array.from({ length: count }, () => [])];
  }

  push(t, values) {
    this.data[0].push(t);
    values.forEach((v, i) => this.data[i + 1].push(v ?? null));
    if (this.data[0].length > WINDOW) for (const column of this.data) column.shift();
  }
}

function color(name, fallback) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || fallback;
}

/** A tick of the time axis: the local time of day. */
function clock(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function fit(plot, el, height) {
  const width = Math.max(el.clientWidth, 120);
  plot.setSize({ width, height });
}

/** A chart of `series` in `el`: `labels` name its values; `format` renders the y axis. */
export function lineChart(el, series, labels, { height = 160, format = (v) => v } = {}) {
  const text = color("--fg-muted", "#555");
  const grid = color("--grid", "#ddd");
  const palette = [color("--accent", "#2563eb"), color("--warn", "#b45309"), color("--ok", "#15803d")];
  const plot = new uPlot(
    {
      width: Math.max(el.clientWidth, 120),
      height,
      legend: { show: true },
      cursor: { drag: { x: false, y: false } },
      // The last five minutes, however few samples there are yet.
      scales: { x: { time: true, range: (_u, _min, max) => [max - WINDOW, max] }, y: { range: (_u, _min, max) => [0, Math.max(max * 1.1, 1)] } },
      axes: [
        { stroke: text, grid: { stroke: grid }, values: (_u, ticks) => ticks.map(clock) },
        { stroke: text, grid: { stroke: grid }, values: (_u, ticks) => ticks.map(format), size: 70 },
      ],
      series: [{}, ...labels.map((label, i) => ({ label, stroke: palette[i % palette.length], width: 2, value: (_u, v) => (v === null ? "–" : format(v)) }))],
    },
    series.data,
    el,
  );
  const resize = new ResizeObserver(() => fit(plot, el, height));
  resize.observe(el);
  el.setAttribute("role", "img");
  const describe = () => {
    const last = series.data.map((column) => column[column.length - 1]);
    const now = labels.map((label, i) => `${label} ${last[i + 1] === null || last[i + 1] === undefined ? "–" : format(last[i + 1])}`);
    el.setAttribute("aria-label", `Chart of the last five minutes; now: ${now.join(", ")}`);
  };
  describe();
  return {
    update: () => {
      plot.setData(series.data);
      describe();
    },
    destroy: () => {
      resize.disconnect();
      plot.destroy();
    },
  };
}

/** A small line without axes, for a table cell. */
export function sparkline(el, series, label) {
  const plot = new uPlot(
    {
      width: 120,
      height: 28,
      legend: { show: false },
      cursor: { show: false },
      axes: [{ show: false }, { show: false }],
      scales: { x: { time: true, range: (_u, _min, max) => [max - WINDOW, max] }, y: { range: (_u, _min, max) => [0, Math.max(max, 1)] } },
      series: [{}, { label, stroke: color("--accent", "#2563eb"), width: 1.5, fill: color("--accent-soft", "#2563eb22") }],
    },
    series.data,
    el,
  );
  el.setAttribute("role", "img");
  el.setAttribute("aria-label", label);
  return { update: () => plot.setData(series.data), destroy: () => plot.destroy() };
}
