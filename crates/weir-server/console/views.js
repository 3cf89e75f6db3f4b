// The pages of what runs: the overview (source, log, operators, subscriptions, queues), one
// consumer's page (lanes or emitters, the halted event, parked events, failures), process
// status, and the event store's streams. Each page is `{element, update(overview), destroy}`:
// `app.js` calls `update` once a second from the live overview stream, and after an action
// with `{force: true}`; what the overview does not carry (parked events, failures, streams)
// is read here, throttled.

import { ApiError, get, post } from "./api.js";
import { lineChart, sparkline } from "./charts.js";
import { badge, figure, fill, formatBytes, formatNumber, formatSeconds, h, jsonView, keepFocus, table, time } from "./dom.js";

const enc = encodeURIComponent;

/** A consumer's lag: its furthest-behind lane's. */
export function lagOf(c) {
  return {
    events: Math.max(0, ...c.lanes.map((l) => l.lag_events)),
    seconds: Math.max(0, ...c.lanes.map((l) => l.lag_seconds)),
  };
}

/**
 * Re-reads `load` at most every `ms` (at once when forced), one read in flight: a forced call
 * during a read runs again when it ends, so an action's effect is never hidden by an older read.
 */
export function throttled(load, ms = 2000) {
  let last = 0;
  let busy = false;
  let again = false;
  const run = async (force) => {
    const now = Date.now();
    if (busy) {
      again ||= force;
      return;
    }
    if (!force && now - last < ms) return;
    busy = true;
    last = now;
    try {
      await load();
    } finally {
      busy = false;
      if (again) {
        again = false;
        run(true);
      }
    }
  };
  return run;
}

/** A button for an action: off, saying why, when no token is configured. */
export function actionButton(ctx, attrs, label) {
  const off = !ctx.canAct;
  return h("button", {
    type: "button",
    ...attrs,
    disabled: off,
    "aria-describedby": off ? "read-only-note" : undefined,
    title: off ? "No token is configured ([http] token), so actions are off" : attrs.title,
  }, label);
}

/** A `<details>` that reads its content when first opened. */
export function onDemand(summary, make) {
  const details = h("details", {}, h("summary", {}, summary));
  details.addEventListener("toggle", () => {
    if (details.open && details.children.length === 1) details.append(make());
  });
  return details;
}

export function overviewPage(ctx) {
  const figures = h("dl", { class: "figures", "data-testid": "source" });
  const log = h("dl", { class: "figures", "data-testid": "log" });
  const chartBox = h("div", { class: "chart", "data-testid": "events-chart" });
  const operators = h("div", { "data-testid": "operators" });
  const subs = h("div", { "data-testid": "subscriptions" });
  const queues = h("div", { "data-testid": "queues" });
  const element = h("section", { "aria-labelledby": "overview-title" },
    h("h1", { id: "overview-title" }, "Overview"),
    h("div", { class: "cards" },
      h("section", { class: "card" }, h("h2", {}, "Source"), figures,
        h("h3", {}, "Events per second, last minutes"), chartBox),
      h("section", { class: "card" }, h("h2", {}, "Log"), log)),
    h("section", { class: "card" }, h("h2", {}, "Operators"), operators),
    h("section", { class: "card" }, h("h2", {}, "Subscriptions"), subs),
    h("section", { class: "card" }, h("h2", {}, "Job queues"), queues, h("p", {}, h("a", { href: "#/jobs" }, "All jobs"))));
  let chart = null;
  const sparks = new Map();

  function lagCell(name) {
    const series = ctx.history.lag.get(name);
    if (!series) return "";
    const el = h("div", { class: "spark" });
    sparks.set(name, { el, series });
    return el;
  }

  function consumerTable(caption, rows, kind) {
    return table(caption, [
      ["Name", (c) => h("a", { href: `#/${kind}/${enc(c.name)}`, "data-key": `${kind}:${c.name}` }, c.name)],
      ["State", (c) => badge(c.state)],
      ["Lag (events)", (c) => formatNumber(lagOf(c).events)],
      ["Lag (seconds)", (c) => formatSeconds(lagOf(c).seconds)],
      ["Lag, last minutes", (c) => lagCell(c.name)],
      [kind === "subscriptions" ? "Emitters" : "Lanes", (c) => String(c.lanes.length)],
      ["Parked", (c) => formatNumber(c.parked)],
    ], rows, kind === "subscriptions" ? "No subscriptions." : "No operators.");
  }

  return {
    element,
    update(o) {
      const s = o.source;
      fill(figures,
        figure("Slot", `${s.slot}${s.slot_active ? "" : " (not streaming)"}`, "slot"),
        figure("Slot lag", formatBytes(s.slot_lag_bytes), "slot-lag"),
        figure("Seconds behind", formatSeconds(s.seconds_behind), "seconds-behind"),
        figure("Events/s", formatNumber(s.events_per_second), "events-per-second"),
        figure("Held by", s.holder ?? "nobody", "holder"));
      fill(log,
        figure("Head", formatNumber(o.log.head), "log-head"),
        figure("Oldest retained", formatNumber(o.log.oldest), "log-oldest"),
        figure("Retention", formatSeconds(o.log.retention_seconds), "log-retention"),
        figure("Entities", o.log.entities.join(", ") || "none yet", "log-entities"));
      if (!chart) chart = lineChart(chartBox, ctx.history.source, ["events/s"], { format: formatNumber });
      chart.update();
      const subNames = new Set(o.subscriptions.map((x) => x.subscription_name));
      sparks.forEach((x) => x.plot?.destroy());
      sparks.clear();
      keepFocus(operators, () => fill(operators, consumerTable("Operators", o.consumers.filter((c) => !subNames.has(c.name)), "consumers")));
      keepFocus(subs, () => fill(subs, consumerTable("Subscriptions", o.consumers.filter((c) => subNames.has(c.name)), "subscriptions")));
      for (const [name, s] of sparks) s.plot = sparkline(s.el, s.series, `lag of ${name}, events`);
      fill(queues, table("Job queues", [
        ["Queue", (q) => q.queue],
        ["Available", (q) => formatNumber(q.available)],
        ["Scheduled", (q) => formatNumber(q.scheduled)],
        ["Retryable", (q) => formatNumber(q.retryable)],
        ["Running", (q) => formatNumber(q.running)],
        ["Completed/s", (q) => formatNumber(q.completed_per_sec)],
        ["Discarded (1 h)", (q) => formatNumber(q.discarded_last_hour)],
      ], o.jobs, "No jobs yet."));
    },
    destroy() {
      chart?.destroy();
      sparks.forEach((s) => s.plot?.destroy());
    },
  };
}

/** The event at `position`, from the log (null when it is no longer retained). */
async function eventAt(position) {
  const page = await get(`/v1/log?after=${position - 1}&limit=1`);
  const e = page.events?.[0];
  return e && e.position === position ? e : null;
}

function eventBlock(position, label) {
  const box = h("div", { "data-testid": "event-json" }, h("p", { class: "muted" }, `Reading event ${position}…`));
  eventAt(position).then(
    (e) => fill(box, e ? jsonView(e, label) : h("p", { class: "muted" }, `Event ${position} is no longer in the log (retention).`)),
    (e) => fill(box, h("p", { class: "error-text" }, `Could not read event ${position}: ${e.message}`)),
  );
  return box;
}

/** A consumer's page: `kind` is `consumers` (an operator) or `subscriptions`. */
export function consumerPage(ctx, kind, name) {
  const base = `/v1/${kind}/${enc(name)}`;
  const title = h("h1", {}, `${kind === "subscriptions" ? "Subscription" : "Operator"} ${name}`);
  const status = h("div", {});
  const halted = h("div", { "data-testid": "halted" });
  const lanes = h("div", { "data-testid": "lanes" });
  const parked = h("div", { "data-testid": "parked" });
  const failures = h("div", { "data-testid": "failures" });
  const parts = [title, status, halted,
    h("section", { class: "card" }, h("h2", {}, kind === "subscriptions" ? "Emitters" : "Lanes"), lanes),
    h("section", { class: "card" }, h("h2", {}, "Parked events"), parked),
    h("section", { class: "card" }, h("h2", {}, "Recent failures"), failures)];
  const element = h("section", {}, parts);
  let haltedAt = null;
  let parkedKey = "";
  let missing = false;
  const act = (label, path, body) => ctx.act(label, () => post(`${base}${path}`, body));

  const loadParked = throttled(async () => {
    let rows;
    try {
      rows = await get(`${base}/parked`);
    } catch (e) {
      fill(parked, h("p", { class: "error-text" }, e.message));
      parkedKey = "";
      return;
    }
    const key = JSON.stringify(rows);
    if (key === parkedKey) return;
    parkedKey = key;
    const all = rows.length
      ? h("p", { class: "actions" },
        actionButton(ctx, { "data-action": "retry-all", onclick: () => act("Retry all parked", "/parked/retry") }, `Retry all (${rows.length})`),
        actionButton(ctx, { class: "danger", "data-action": "discard-all", onclick: () => confirm(`Discard all ${rows.length} parked events of ${name}? They are not handled again.`) && act("Discard all parked", "/parked/discard") }, "Discard all"))
      : null;
    fill(parked, all, table("Parked events", [
      ["Position", (p) => String(p.position)],
      ["Key", (p) => p.partition_key],
      ["Entity", (p) => p.entity],
      ["Attempts", (p) => String(p.attempts)],
      ["Error", (p) => h("span", { class: "error-text" }, p.error)],
      ["", (p) => p.retry_requested ? "retry pending" : h("span", { class: "actions" },
        actionButton(ctx, { "data-action": "retry", "aria-label": `Retry parked event ${p.position}`, onclick: () => act(`Retry ${p.position}`, "/parked/retry", { position: p.position }) }, "Retry"),
        actionButton(ctx, { class: "danger", "data-action": "discard", "aria-label": `Discard parked event ${p.position}`, onclick: () => confirm(`Discard parked event ${p.position}?`) && act(`Discard ${p.position}`, "/parked/discard", { position: p.position }) }, "Discard"))],
      ["Event", (p) => onDemand(`Show event ${p.position}`, () => eventBlock(p.position, `parked event ${p.position}`))],
    ], rows, "No parked events."));
  });

  const loadFailures = throttled(async () => {
    let rows;
    try {
      rows = await get(`/v1/consumers/${enc(name)}/failures?limit=20`);
    } catch (e) {
      fill(failures, h("p", { class: "error-text" }, e.message));
      return;
    }
    fill(failures, table("Recent failures", [
      ["When", (f) => time(f.at)],
      ["Position", (f) => String(f.position)],
      ["Lane", (f) => String(f.lane)],
      ["Attempt", (f) => String(f.attempt)],
      ["Outcome", (f) => badge(f.outcome)],
      ["Error", (f) => h("span", { class: "error-text" }, f.error)],
    ], rows, "No failures recorded."), null);
  }, 3000);

  return {
    element,
    update(o, { force } = {}) {
      const c = o.consumers.find((x) => x.name === name);
      if (c && missing) {
        // It exists now (a subscription created after the page opened).
        missing = false;
        fill(element, parts);
      }
      if (!c) {
        if (!missing) {
          missing = true;
          fill(element, h("h1", {}, `No ${kind === "subscriptions" ? "subscription" : "consumer"} named ${name}`),
            h("p", { "data-testid": "unknown-consumer" }, `weir has no ${kind === "subscriptions" ? "subscription" : "operator"} called “${name}”. `,
              h("a", { href: "#/" }, "The overview lists them.")));
        }
        return;
      }
      const lag = lagOf(c);
      const sub = o.subscriptions.find((s) => s.subscription_name === name);
      fill(status, h("dl", { class: "figures" },
        figure("State", badge(c.state), "state"),
        figure("Lag", `${formatNumber(lag.events)} events, ${formatSeconds(lag.seconds)}`, "lag"),
        figure("Parked", formatNumber(c.parked), "parked-count"),
        sub ? figure("Sink", typeof sub.sink === "string" ? sub.sink : sub.sink?.type ?? "–", "sink") : null,
        sub ? figure("Selector", JSON.stringify(sub.selector), "selector") : null,
        c.stopped_reason ? figure("Stopped because", c.stopped_reason, "stopped-reason") : null));
      fill(lanes, table(kind === "subscriptions" ? "Emitters" : "Lanes", [
        [kind === "subscriptions" ? "Emitter" : "Lane", (l) => String(l.lane)],
        ["State", (l) => badge(l.state)],
        ["Position", (l) => formatNumber(l.position)],
        ["Lag (events)", (l) => formatNumber(l.lag_events)],
        ["Lag (seconds)", (l) => formatSeconds(l.lag_seconds)],
        ["Working on", (l) => (l.current_position ? `${l.current_position} (attempt ${l.attempt})` : "–")],
        ["Owner", (l) => l.owner ?? "–"],
        ["Last error", (l) => (l.last_error ? h("span", { class: "error-text" }, l.last_error) : "–")],
      ], c.lanes, "No lanes yet."));
      const at = c.state === "halted" ? c.halted?.position ?? null : null;
      if (at !== haltedAt) {
        haltedAt = at;
        if (at === null) {
          fill(halted);
        } else {
          fill(halted, h("section", { class: "card halted", "aria-labelledby": "halted-title" },
            h("h2", { id: "halted-title" }, `Halted at event ${at}`),
            h("p", {}, `Lane ${c.halted.lane}, attempt ${c.halted.attempt}: `, h("span", { class: "error-text" }, c.halted.error)),
            h("p", { class: "actions" },
              actionButton(ctx, { "data-action": "resume", onclick: () => act("Resume", "/resume") }, "Resume (retry this event)"),
              actionButton(ctx, { class: "danger", "data-action": "skip", onclick: () => confirm(`Skip event ${at}? ${name} will never handle it.`) && act("Skip", "/skip") }, "Skip this event")),
            eventBlock(at, `halted event ${at}`)));
        }
      }
      loadParked(force);
      loadFailures(force);
    },
  };
}

/** "Has this write been processed?" for `posts/<µs>` or an LSN, live (long-polls until yes). */
export function processPage(ctx) {
  const input = h("input", { id: "watermark", name: "watermark", placeholder: "posts/1422057007123000 or 0/16B3748", autocomplete: "off", spellcheck: "false" });
  const answer = h("div", { "data-testid": "process-answer", role: "status", "aria-live": "polite" });
  let run = 0;
  async function check(value) {
    const mine = ++run;
    // An LSN is two 32-bit halves in hex (`0/16B3748`); an entity timestamp has 16 digits of µs.
    const param = /^[0-9A-Fa-f]{1,8}\/[0-9A-Fa-f]{1,8}$/.test(value) ? `lsn=${enc(value)}` : `entity_timestamp=${enc(value)}`;
    const wait = Math.max(1, Math.min(10, ctx.access.max_wait_seconds ?? 10));
    fill(answer, h("p", {}, "Checking…"));
    for (;;) {
      try {
        await get(`/v1/process/wait?${param}&timeout=${wait}s`);
        if (mine === run) fill(answer, h("p", { class: "ok-text", "data-testid": "processed" }, `${value} is processed: every consumer listening has handled it.`));
        return;
      } catch (e) {
        if (mine !== run) return;
        if (e instanceof ApiError && e.status === 425) {
          fill(answer, h("p", { class: "warn-text", "data-testid": "not-processed" }, `${value} is not processed yet (425 Too Early); still watching…`));
          continue;
        }
        if (e instanceof ApiError && (e.status === 0 || e.status === 503)) {
          fill(answer, h("p", { class: "warn-text" }, "Disconnected, retrying…"));
          await new Promise((r) => setTimeout(r, 2000));
          continue;
        }
        fill(answer, h("p", { class: "error-text", "data-testid": "process-error" }, e.message));
        return;
      }
    }
  }
  const form = h("form", { class: "inline", onsubmit: (e) => { e.preventDefault(); if (input.value.trim()) check(input.value.trim()); } },
    h("label", { for: "watermark" }, "Entity and timestamp (µs), or LSN"), input, h("button", { type: "submit" }, "Check"));
  return {
    element: h("section", {}, h("h1", {}, "Process status"),
      h("p", {}, "Has a write reached the derived data yet? The answer waits and turns to “processed” as soon as it is."),
      form, answer),
    destroy() {
      run += 1;
    },
  };
}

/** The event store's streams, by name. */
export function streamsPage() {
  const list = h("div", { "data-testid": "streams" }, h("p", { class: "muted" }, "Reading…"));
  const prefix = h("input", { id: "prefix", placeholder: "order-", autocomplete: "off" });
  async function load() {
    try {
      const q = prefix.value.trim() ? `?prefix=${enc(prefix.value.trim())}&limit=200` : "?limit=200";
      const rows = await get(`/v1/streams${q}`);
      fill(list, table("Streams", [
        ["Stream", (s) => h("a", { href: `#/streams/${enc(s.stream)}` }, s.stream)],
        ["Version", (s) => String(s.version)],
        ["Updated", (s) => time(s.updated_at)],
        ["Deleted", (s) => (s.deleted_at ? time(s.deleted_at) : "–")],
      ], rows, "No streams yet: append with POST /v1/streams/{stream}."));
    } catch (e) {
      fill(list, h("p", { class: "error-text" }, e.message));
    }
  }
  load();
  const refresh = throttled(load, 3000);
  return {
    element: h("section", {}, h("h1", {}, "Streams"),
      h("form", { class: "inline", onsubmit: (e) => { e.preventDefault(); load(); } },
        h("label", { for: "prefix" }, "Name starts with"), prefix, h("button", { type: "submit" }, "Filter")),
      list),
    update: () => refresh(),
  };
}

/** One stream's events, newest first. */
export function streamPage(ctx, name) {
  const list = h("div", { "data-testid": "stream-events" }, h("p", { class: "muted" }, "Reading…"));
  async function load() {
    try {
      const page = await get(`/v1/streams/${enc(name)}?direction=backward&limit=100`);
      fill(list, table("Events", [
        ["Version", (e) => String(e.version)],
        ["Position", (e) => (e.position === null || e.position === undefined ? "–" : String(e.position))],
        ["Type", (e) => e.type],
        ["Recorded", (e) => time(e.created_at ?? e.recorded_at)],
        ["Data", (e) => onDemand(`Show version ${e.version}`, () => jsonView(e, `event ${e.version}`))],
      ], page.events, "No events."));
    } catch (e) {
      fill(list, h("p", { class: "error-text", "data-testid": "stream-error" }, e.message));
    }
  }
  load();
  const refresh = throttled(load, 3000);
  return {
    element: h("section", {}, h("h1", {}, `Stream ${name}`), h("p", {}, h("a", { href: "#/streams" }, "All streams")), list),
    update: () => refresh(),
  };
}
