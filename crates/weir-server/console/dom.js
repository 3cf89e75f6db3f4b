// Building the page: elements from data, never from HTML strings (an event's data is shown as
// text, so it cannot become markup), and the formats every view shares.

/** `h("a", {href: "#/"}, "Overview")`: an element with attributes, properties and children. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/**
 * Runs `render` (which refills `container`) and gives the focus back to the element with the
 * same `data-key` if one inside had it: a table refreshed every second keeps the keyboard's place.
 */
export function keepFocus(container, render) {
  const focused = document.activeElement;
  const key = container.contains(focused) ? focused?.dataset?.key : undefined;
  render();
  if (key) container.querySelector(`[data-key="${CSS.escape(key)}"]`)?.focus();
}

/** Replaces `el`'s children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** A table: `columns` are `[heading, (row) => cell]`; `empty` shows when there are no rows. */
export function table(caption, columns, rows, empty = "None.") {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h(
    "table",
    {},
    h("caption", { class: "visually-hidden" }, caption),
    h("thead", {}, h("tr", {}, columns.map(([name]) => h("th", { scope: "col" }, name)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, columns.map(([, cell]) => h("td", {}, cell(r)))))),
  );
}

/** Characters of JSON shown before "Show all". */
export const JSON_PREVIEW = 4000;

/** Pretty JSON in a `<pre>`, cut at `JSON_PREVIEW` characters with a button for the rest. */
export function jsonView(value, label = "JSON") {
  const text = JSON.stringify(value, null, 2) ?? "null";
  const pre = h("pre", { class: "json", tabindex: "0", "aria-label": label });
  if (text.length <= JSON_PREVIEW) {
    pre.textContent = text;
    return pre;
  }
  pre.textContent = text.slice(0, JSON_PREVIEW) + "\n…";
  const more = h("button", {
    type: "button",
    class: "link",
    "data-action": "show-all",
    onclick: () => {
      pre.textContent = text;
      more.remove();
    },
  }, `Show all (${formatBytes(text.length)})`);
  return h("div", { class: "json-wrap" }, pre, more);
}

/** A state as a coloured badge. */
export function badge(state) {
  return h("span", { class: `badge badge-${state}` }, state);
}

export function formatNumber(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  return Number(n).toLocaleString("en-US", { maximumFractionDigits: 1 });
}

export function formatBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = Number(n);
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v.toLocaleString("en-US", { maximumFractionDigits: i ? 1 : 0 })} ${units[i]}`;
}

export function formatSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 120) return `${s.toFixed(1)} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} d`;
}

/** An RFC 3339 instant as a `Date`; fractions beyond milliseconds are cut (not every engine reads them). */
export function parseTime(iso) {
  return new Date(String(iso).replace(/(\.\d{3})\d+/, "$1"));
}

export function formatTime(iso) {
  if (!iso) return "–";
  const d = parseTime(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
}

/** A `<time>` with the local time, the ISO instant on hover. */
export function time(iso) {
  return iso ? h("time", { datetime: iso, title: iso }, formatTime(iso)) : "–";
}

/** A labelled figure: `<div><dt>label</dt><dd>value</dd></div>` for a `<dl class="figures">`. */
export function figure(label, value, testid) {
  return h("div", {}, h("dt", {}, label), h("dd", { "data-testid": testid }, value));
}
