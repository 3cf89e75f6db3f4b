// The jobs page: counts per queue and state, throughput and wait charts from the live overview,
// the jobs themselves filtered by state, queue and kind (Retry, Cancel), the periodic jobs with
// their next run, and the workers of the live processes. `update(overview)` comes once a second
// from `app.js`; the lists are read again every 2 s, with the filter last applied.

import { get, post } from "./api.js";
import { lineChart } from "./charts.js";
import { badge, fill, formatNumber, formatSeconds, h, jsonView, keepFocus, table, time } from "./dom.js";
import { actionButton, onDemand } from "./views.js";

const STATES = ["", "scheduled", "available", "running", "retryable", "completed", "discarded", "cancelled"];
const FINISHED = new Set(["completed", "discarded", "cancelled"]);


export function jobsPage(ctx) {
  const counts = h("div", { "data-testid": "job-counts" });
  const throughput = h("div", { class: "chart", "data-testid": "throughput-chart" });
  const wait = h("div", { class: "chart", "data-testid": "wait-chart" });
  const list = h("div", { "data-testid": "jobs" }, h("p", { class: "muted" }, "Reading…"));
  const periodic = h("div", { "data-testid": "periodic" });
  const workers = h("div", { "data-testid": "workers" });
  const state = h("select", { id: "job-state", name: "state" }, STATES.map((s) => h("option", { value: s }, s || "any")));
  const queue = h("input", { id: "job-queue", name: "queue", autocomplete: "off", placeholder: "any" });
  const kind = h("input", { id: "job-kind", name: "kind", autocomplete: "off", placeholder: "any" });
  const filters = h("form", { class: "inline", onsubmit: (e) => { e.preventDefault(); apply(); } },
    h("label", { for: "job-state" }, "State"), state,
    h("label", { for: "job-queue" }, "Queue"), queue,
    h("label", { for: "job-kind" }, "Kind"), kind,
    h("button", { type: "submit" }, "Filter"));
  const element = h("section", {}, h("h1", {}, "Jobs"),
    h("section", { class: "card" }, h("h2", {}, "Queues"), counts),
    h("div", { class: "cards" },
      h("section", { class: "card" }, h("h2", {}, "Throughput (jobs/s)"), throughput),
      h("section", { class: "card" }, h("h2", {}, "Wait from available to start (slowest queue, last minute)"), wait)),
    h("section", { class: "card" }, h("h2", {}, "Jobs"), filters, list),
    h("section", { class: "card" }, h("h2", {}, "Periodic jobs"), periodic),
    h("section", { class: "card" }, h("h2", {}, "Workers"), workers));
  let charts = null;
  let lastList = "";
  let lastRead = 0;
  // The filter of the last Filter press (not what is being typed), and the newest read: an
  // older answer arriving late is dropped.
  let applied = {};
  let reads = 0;

  function apply() {
    applied = { state: state.value, queue: queue.value.trim(), kind: kind.value.trim() };
    loadJobs(true);
  }

  const act = (label, id, what) => ctx.act(`${label} job ${id}`, () => post(`/v1/jobs/${id}/${what}`)).then(() => loadJobs(true));

  async function loadJobs(force) {
    const q = new URLSearchParams({ limit: "100" });
    for (const [k, v] of Object.entries(applied)) if (v) q.set(k, v);
    const mine = ++reads;
    let rows;
    try {
      rows = await get(`/v1/jobs?${q}`);
      if (mine !== reads) return;
    } catch (e) {
      if (mine !== reads) return;
      fill(list, h("p", { class: "error-text", "data-testid": "jobs-error" }, e.message));
      lastList = "";
      return;
    }
    const key = JSON.stringify(rows);
    if (!force && key === lastList) return;
    lastList = key;
    fill(list, table("Jobs", [
      ["Id", (j) => String(j.id)],
      ["State", (j) => badge(j.state)],
      ["Queue", (j) => j.queue],
      ["Kind", (j) => j.kind],
      ["Attempts", (j) => `${j.attempt} / ${j.max_attempts}`],
      ["Scheduled", (j) => time(j.scheduled_at)],
      ["Note", (j) => (j.note ? h("span", { class: FINISHED.has(j.state) || j.state === "retryable" ? "error-text" : "" }, j.note) : "–")],
      ["Args and errors", (j) => onDemand(`Show job ${j.id}`, () => jsonView({ args: j.args, errors: j.errors }, `job ${j.id}`))],
      ["", (j) => h("span", { class: "actions", "data-job": String(j.id) },
        j.state !== "running" && j.state !== "available" ? actionButton(ctx, { "data-action": "retry-job", "aria-label": `Retry job ${j.id}`, onclick: () => act("Retry", j.id, "retry") }, "Retry") : null,
        !FINISHED.has(j.state) ? actionButton(ctx, { class: "danger", "data-action": "cancel-job", "aria-label": `Cancel job ${j.id}`, onclick: () => confirm(`Cancel job ${j.id} (${j.kind})?`) && act("Cancel", j.id, "cancel") }, "Cancel") : null)],
    ], rows, "No jobs match."));
  }

  async function loadSide() {
    try {
      const rows = await get("/v1/jobs/periodic");
      fill(periodic, table("Periodic jobs", [
        ["Name", (p) => p.name],
        ["Kind", (p) => p.kind ?? "–"],
        ["Cron", (p) => (p.cron ? `${p.cron} (${p.timezone})` : "declared elsewhere")],
        ["Last enqueued for", (p) => time(p.last_at)],
        ["Next run", (p) => time(p.next_at)],
      ], rows, "No periodic jobs ([[periodic]] in weir.toml)."));
    } catch (e) {
      fill(periodic, h("p", { class: "error-text" }, e.message));
    }
    try {
      const rows = await get("/v1/jobs/workers");
      fill(workers, table("Workers", [
        ["Kind", (w) => w.kind],
        ["Type", (w) => w.type],
        ["Queue", (w) => w.queue],
        ["Slots", (w) => String(w.concurrency)],
        ["Processes", (w) => String(w.processes)],
        ["Running", (w) => String(w.running)],
        ["Last error", (w) => (w.last_error ? h("span", { class: "error-text" }, `${w.last_error} (job ${w.last_error_job}, `, time(w.last_error_at), ")") : "–")],
      ], rows, "No worker runs in a live process."));
    } catch (e) {
      fill(workers, h("p", { class: "error-text" }, e.message));
    }
  }

  loadJobs();
  loadSide();
  return {
    element,
    update(o, { force } = {}) {
      const byState = ["available", "scheduled", "retryable", "running"];
      keepFocus(counts, () => fill(counts, table("Jobs per queue and state", [
        ["Queue", (q) => h("button", { type: "button", class: "link", "data-key": `queue:${q.queue}`, "aria-label": `Show the jobs of queue ${q.queue}`, onclick: () => { queue.value = q.queue; apply(); } }, q.queue)],
        ...byState.map((s) => [s[0].toUpperCase() + s.slice(1), (q) => formatNumber(q[s])]),
        ["Completed/s", (q) => formatNumber(q.completed_per_sec)],
        ["Discarded (1 h)", (q) => formatNumber(q.discarded_last_hour)],
        ["Oldest wait", (q) => formatSeconds(q.oldest_available_secs)],
        ["Wait p95 (1 min)", (q) => formatSeconds(q.wait_p95_secs)],
      ], o.jobs, "No jobs yet.")));
      if (!charts) {
        charts = [
          lineChart(throughput, ctx.history.jobs, ["completed/s", "started/s"], { format: formatNumber }),
          lineChart(wait, ctx.history.wait, ["p50 (slowest queue)", "p95 (slowest queue)"], { format: formatSeconds }),
        ];
      }
      charts.forEach((c) => c.update());
      const now = Date.now();
      if (force || now - lastRead > 2000) {
        lastRead = now;
        loadJobs(force);
        loadSide();
      }
    },
    destroy() {
      charts?.forEach((c) => c.destroy());
    },
  };
}

