// The live log: changes as they are logged, through the realtime channels over SSE (one
// channel per entity the log has seen), filtered by entity and kind in the page; pause; an
// event's full JSON on click; a jump to a position reads the log from there.

import { get, stream } from "./api.js";
import { fill, h, jsonView, parseTime } from "./dom.js";

/** Events kept on the page, newest first. */
const KEEP = 500;
const KINDS = ["", "insert", "update", "delete", "truncate", "message", "append", "read"];

export function livePage(ctx) {
  const entity = h("select", { id: "live-entity", name: "entity" }, h("option", { value: "" }, "any"));
  const kind = h("select", { id: "live-kind", name: "kind" }, KINDS.map((k) => h("option", { value: k }, k || "any")));
  const pause = h("button", { type: "button", "aria-pressed": "false", "data-action": "pause" }, "Pause");
  const jump = h("input", { id: "live-jump", name: "position", inputmode: "numeric", pattern: "[0-9]+", placeholder: "position", autocomplete: "off" });
  const state = h("p", { class: "muted", role: "status", "data-testid": "live-state" }, "Connecting…");
  const rows = h("tbody", {});
  const detail = h("div", { class: "detail", id: "live-detail", "aria-live": "polite", "data-testid": "live-detail" }, h("p", { class: "muted" }, "Click an event to see all of it."));
  const element = h("section", {}, h("h1", {}, "Live log"),
    h("div", { class: "inline" },
      h("label", { for: "live-entity" }, "Entity"), entity,
      h("label", { for: "live-kind" }, "Kind"), kind, pause,
      h("form", { class: "inline", onsubmit: (e) => { e.preventDefault(); jumpTo(jump.value.trim()); } },
        h("label", { for: "live-jump" }, "Jump to"), jump, h("button", { type: "submit" }, "Go"))),
    state,
    h("div", { class: "split" },
      h("table", { class: "log", "data-testid": "live-events" },
        h("caption", { class: "visually-hidden" }, "Events, newest first"),
        h("thead", {}, h("tr", {}, ["Position", "Committed", "Entity", "Kind", "Key"].map((c) => h("th", { scope: "col" }, c)))),
        rows),
      detail));

  let events = [];
  let entities = [];
  let live = null;
  let lastPosition = null;
  let paused = false;
  let buffered = [];
  let dropped = 0;
  // Showing a page read by Jump to, not the live tail: Resume starts the list afresh.
  let jumped = false;

  function matches(e) {
    return (!entity.value || e.entity === entity.value) && (!kind.value || e.kind === kind.value);
  }

  function row(e) {
    // The row answers a click anywhere; the position is a button for the keyboard.
    const tr = h("tr", { "data-position": String(e.position), onclick: () => show(e) },
    h("td", {}, h("button", { type: "button", class: "link", "aria-controls": "live-detail", "aria-label": `Show event ${e.position}` }, String(e.position))),
    h("td", {}, e.commit_ts ? parseTime(e.commit_ts).toLocaleTimeString() : "–"),
    h("td", {}, e.entity),
    h("td", {}, e.kind),
    h("td", { class: "mono" }, JSON.stringify(e.key ?? {})));
    return tr;
  }

  function show(e, focus = true) {
    const title = h("h2", { tabindex: "-1" }, `Event ${e.position}`);
    fill(detail, title, jsonView(e, `event ${e.position}`));
    if (focus) title.focus();
  }

  function redraw() {
    fill(rows, events.filter(matches).slice(0, KEEP).map(row));
  }

  function add(list) {
    if (paused) {
      buffered.push(...list);
      if (buffered.length > KEEP) {
        dropped += buffered.length - KEEP;
        buffered = buffered.slice(-KEEP);
      }
      fill(state, `Paused: ${buffered.length} new events waiting${dropped ? ` (${dropped} older ones will not be shown)` : ""}.`);
      return;
    }
    for (const e of list) {
      events.unshift(e);
      if (matches(e)) rows.prepend(row(e));
    }
    if (events.length > KEEP) events = events.slice(0, KEEP);
    while (rows.children.length > KEEP) rows.lastChild.remove();
  }

  function connect() {
    live?.stop();
    const usable = entities.filter((e) => !e.includes("/")).slice(0, 256);
    if (!usable.length) {
      fill(state, "Nothing is logged yet: events appear here as soon as a watched table changes.");
      return;
    }
    const q = new URLSearchParams();
    q.set("channel", usable.join(","));
    if (lastPosition !== null) q.set("after", String(lastPosition));
    live = stream(`/v1/channels/sse?${q}`, (type, data) => {
      if (type === "change" && data.event) {
        lastPosition = data.position;
        add([data.event]);
      } else if (type === "gap") {
        fill(state, data.message);
      } else if (type === "close") {
        fill(state, `${data.message}`);
      }
    }, (s, detailText) => {
      if (paused) return;
      fill(state, s === "live" ? `Live: following ${usable.join(", ")}.` : s === "retrying" ? "Disconnected, retrying…" : `Refused: ${detailText}`);
    });
  }

  function setEntities(list) {
    const next = [...list].sort();
    if (JSON.stringify(next) === JSON.stringify(entities)) return;
    entities = next;
    const chosen = entity.value;
    fill(entity, h("option", { value: "" }, "any"), entities.map((e) => h("option", { value: e, selected: e === chosen }, e)));
    connect();
  }

  async function jumpTo(value) {
    if (!/^[0-9]+$/.test(value)) {
      fill(state, "A position is a whole number (the log's positions start at 1).");
      return;
    }
    const position = Number(value);
    try {
      const page = await get(`/v1/log?after=${Math.max(position - 1, 0)}&limit=100`);
      paused = true;
      pause.setAttribute("aria-pressed", "true");
      pause.textContent = "Resume";
      events = page.events.slice().reverse();
      jumped = true;
      redraw();
      fill(state, page.events.length
        ? `Showing positions ${page.events[0].position}–${page.events[page.events.length - 1].position} (paused; Resume goes back to live).`
        : `Nothing at or after position ${position} (the head is ${page.head}).`);
      if (page.events.length) show(page.events[0], false);
    } catch (e) {
      fill(state, e.message);
    }
  }

  pause.addEventListener("click", () => {
    paused = !paused;
    pause.setAttribute("aria-pressed", String(paused));
    pause.textContent = paused ? "Resume" : "Pause";
    if (!paused) {
      const waiting = buffered;
      buffered = [];
      dropped = 0;
      if (jumped) {
        jumped = false;
        events = [];
        redraw();
      }
      add(waiting);
      fill(state, "Live.");
    } else {
      fill(state, "Paused.");
    }
  });
  entity.addEventListener("change", redraw);
  kind.addEventListener("change", redraw);

  return {
    element,
    update(o) {
      setEntities(o.log.entities);
    },
    destroy() {
      live?.stop();
    },
  };
}
