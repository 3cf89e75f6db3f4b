// The console's shell: sign-in, the live overview stream every page reads from, the banner for
// halted consumers, the connection indicator, and the router (`#/…` hashes, so the server
// serves one page).

import { ApiError, get, setToken, stream, token } from "./api.js";
import { Series } from "./charts.js";
import { fill, h } from "./dom.js";
import { jobsPage } from "./jobs.js";
import { livePage } from "./live.js";
import { consumerPage, lagOf, overviewPage, processPage, streamPage, streamsPage } from "./views.js";

const main = document.getElementById("main");
const banner = document.getElementById("banner");
const connection = document.getElementById("connection");
const accessBox = document.getElementById("access");
const toast = document.getElementById("toast");

/** What every page shares. Pages get `update(overview)` once a second from the live stream. */
const ctx = {
  access: { token_configured: false, protect_reads: false, max_wait_seconds: 30 },
  overview: null,
  history: { source: new Series(1), lag: new Map(), jobs: new Series(2), wait: new Series(2) },
  say,
  /** Actions are possible: a token is configured (the server says whether the one given is right). */
  get canAct() {
    return this.access.token_configured;
  },
  /** Runs an action; shows its refusal (401 wrong token, 403 no token, 409 …) as the server says it. */
  async act(label, action) {
    try {
      const answer = await action();
      say(`${label}: done`, "ok");
      refresh();
      return answer;
    } catch (e) {
      const why = e instanceof ApiError ? e.message : String(e);
      say(`${label} refused: ${why}`, "error");
      return undefined;
    }
  },
};

let toastTimer;
/** A message in the status area (read by screen readers), kept until the next or for 10 s. */
export function say(message, kind = "info") {
  fill(toast, message);
  toast.dataset.kind = kind;
  toast.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    toast.hidden = true;
  }, 10000);
}

let shownConnection = "";
function setConnection(state, detail) {
  // Only a change is written: the element is a live region, read out on every change.
  const key = `${state}\n${detail ?? ""}`;
  if (key === shownConnection) return;
  shownConnection = key;
  connection.dataset.state = state;
  const text = {
    live: "live",
    retrying: "disconnected, retrying…",
    refused: `refused: ${detail ?? ""}`,
    problem: `a read failed: ${detail ?? ""}`,
    connecting: "connecting…",
  }[state];
  fill(connection, h("span", { class: "dot", "aria-hidden": "true" }), text);
  connection.title = detail ?? "";
}

function renderAccess() {
  const { token_configured, protect_reads } = ctx.access;
  if (!token_configured) {
    fill(accessBox, h("span", { class: "note", id: "read-only-note", "data-testid": "read-only" },
      "Read-only: no token is configured ([http] token), so actions are off."));
    return;
  }
  if (token()) {
    fill(accessBox, h("span", { class: "note" }, "Signed in"),
      h("button", { type: "button", onclick: () => { setToken(null); location.reload(); } }, "Sign out"));
    return;
  }
  const input = h("input", { id: "token", type: "password", autocomplete: "current-password", required: true });
  const form = h("form", {
    class: "login",
    onsubmit: (e) => {
      e.preventDefault();
      setToken(input.value.trim());
      location.reload();
    },
  },
  h("label", { for: "token" }, protect_reads ? "Token (needed to read and act)" : "Token (needed to act)"),
  input,
  h("button", { type: "submit" }, "Sign in"));
  fill(accessBox, form);
}

let shownBanner = "";
function renderBanner() {
  const halted = (ctx.overview?.consumers ?? []).filter((c) => c.state === "halted");
  // An alert is announced whenever it changes: rewrite it only when what it says changes.
  const key = JSON.stringify(halted.map((c) => [c.name, c.halted]));
  if (key === shownBanner) return;
  shownBanner = key;
  if (!halted.length) {
    banner.hidden = true;
    banner.replaceChildren();
    return;
  }
  banner.hidden = false;
  const subs = new Set((ctx.overview?.subscriptions ?? []).map((s) => s.subscription_name));
  fill(banner, halted.map((c) => {
    const where = c.halted ?? {};
    const page = subs.has(c.name) ? `#/subscriptions/${encodeURIComponent(c.name)}` : `#/consumers/${encodeURIComponent(c.name)}`;
    return h("p", { "data-testid": "halted-banner" },
      h("strong", {}, `${subs.has(c.name) ? "Subscription" : "Operator"} ${c.name} is halted`),
      ` at event ${where.position ?? "?"} (lane ${where.lane ?? "?"}, attempt ${where.attempt ?? "?"}): `,
      h("span", { class: "error-text" }, where.error ?? ""),
      " ",
      h("a", { href: page }, "Open"));
  }));
}

function record(o) {
  // The page's clock: samples are a second apart as they arrive.
  const t = Date.now() / 1000;
  const { history } = ctx;
  history.source.push(t, [o.source.events_per_second]);
  for (const c of o.consumers) {
    if (!history.lag.has(c.name)) history.lag.set(c.name, new Series(2));
    const lag = lagOf(c);
    history.lag.get(c.name).push(t, [lag.events, lag.seconds]);
  }
  const sum = (f) => o.jobs.reduce((a, q) => a + (q[f] ?? 0), 0);
  const max = (f) => {
    const v = o.jobs.map((q) => q[f]).filter((x) => x !== null && x !== undefined);
    return v.length ? Math.max(...v) : null;
  };
  history.jobs.push(t, [sum("completed_per_sec"), sum("started_per_sec")]);
  history.wait.push(t, [max("wait_p50_secs"), max("wait_p95_secs")]);
}

const routes = [
  [/^#?\/?$/, () => overviewPage(ctx)],
  [/^#\/consumers\/(.+)$/, (m) => consumerPage(ctx, "consumers", decodeURIComponent(m[1]))],
  [/^#\/subscriptions\/(.+)$/, (m) => consumerPage(ctx, "subscriptions", decodeURIComponent(m[1]))],
  [/^#\/jobs$/, () => jobsPage(ctx)],
  [/^#\/log$/, () => livePage(ctx)],
  [/^#\/process$/, () => processPage(ctx)],
  [/^#\/streams$/, () => streamsPage(ctx)],
  [/^#\/streams\/(.+)$/, (m) => streamPage(ctx, decodeURIComponent(m[1]))],
];

let page = null;
let routed = false;

function route() {
  const hash = location.hash || "#/";
  // `#main` (the skip link) and other in-page anchors are not pages.
  if (!hash.startsWith("#/")) return;
  page?.destroy?.();
  page = null;
  for (const a of document.querySelectorAll("nav a")) {
    const here = a.getAttribute("href") === hash || (hash.startsWith(a.getAttribute("href")) && a.getAttribute("href") !== "#/");
    if (here) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  for (const [re, make] of routes) {
    const m = hash.match(re);
    if (!m) continue;
    try {
      page = make(m);
    } catch (e) {
      // A malformed address (`%` not followed by two hex digits) is not a page.
      if (!(e instanceof URIError)) throw e;
      break;
    }
    main.replaceChildren(page.element);
    document.title = `${page.element.querySelector("h1")?.textContent ?? "weir"} — weir console`;
    if (routed) main.focus();
    routed = true;
    if (ctx.overview) page.update?.(ctx.overview);
    return;
  }
  document.title = "Not found — weir console";
  fill(main, h("h1", {}, "Not found"), h("p", {}, `The console has no page ${hash}. `, h("a", { href: "#/" }, "Back to the overview")));
}

/** Asks the current page to read again (after an action). */
function refresh() {
  if (ctx.overview) page?.update?.(ctx.overview, { force: true });
}

function setupTheme() {
  const button = document.getElementById("theme");
  const saved = localStorage.getItem("weir.theme");
  if (saved) document.documentElement.dataset.theme = saved;
  button.addEventListener("click", () => {
    const dark = document.documentElement.dataset.theme
      ? document.documentElement.dataset.theme === "dark"
      : matchMedia("(prefers-color-scheme: dark)").matches;
    const next = dark ? "light" : "dark";
    document.documentElement.dataset.theme = next;
    localStorage.setItem("weir.theme", next);
    // Charts take their colours when drawn: draw the page again.
    route();
  });
}

async function start() {
  setupTheme();
  setConnection("connecting");
  for (;;) {
    try {
      ctx.access = await get("/v1/access");
      break;
    } catch (e) {
      setConnection("retrying", e.message);
      await new Promise((r) => setTimeout(r, 2000));
    }
  }
  renderAccess();
  if (ctx.access.protect_reads && !token()) {
    setConnection("refused", "sign in to read");
    fill(main, h("h1", {}, "Sign in"), h("p", { "data-testid": "needs-token" },
      "This weir protects reads ([http] protect_reads): enter its token above to see anything."));
    return;
  }
  window.addEventListener("hashchange", route);
  route();
  let wasLive = false;
  stream("/v1/overview/live", (type, data) => {
    if (type === "overview") {
      setConnection("live");
      ctx.overview = data;
      record(data);
      renderBanner();
      page?.update?.(data);
    } else if (type === "problem") {
      setConnection("problem", data.message);
    }
  }, (state, detail, status) => {
    setConnection(state, detail);
    if (state === "live" && wasLive) {
      // Back after a break: the server may have restarted with another token setup.
      get("/v1/access").then((access) => {
        if (JSON.stringify(access) !== JSON.stringify(ctx.access)) {
          ctx.access = access;
          renderAccess();
          route();
        }
      }, () => {});
    }
    if (state === "live") wasLive = true;
    if (state === "refused" && status === 401) {
      say(`${detail} — sign out and sign in with the right token`, "error");
    }
  }, { idleMs: 10000 });
}

start();
