// Talking to weir: JSON requests and Server-Sent Events over fetch, both with the bearer token
// from session storage in the Authorization header (never in a URL: an EventSource cannot set
// headers, so the streams are read with fetch).

const TOKEN_KEY = "weir.token";

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** A refused or failed request: `status` 0 when the server did not answer. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(extra = {}) {
  const h = { Accept: "application/json", ...extra };
  const t = token();
  if (t) h.Authorization = `Bearer ${t}`;
  return h;
}

/** `GET`/`POST`/… `path` with an optional JSON body; the parsed answer, or an `ApiError`. */
export async function request(method, path, body) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }),
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch {
    throw new ApiError(0, "disconnected", "weir does not answer (disconnected); retrying");
  }
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  if (!response.ok) {
    const code = json?.error ?? `http_${response.status}`;
    const message = json?.message ?? (text || response.statusText || `HTTP ${response.status}`);
    throw new ApiError(response.status, code, message);
  }
  return json;
}

export const get = (path) => request("GET", path);

/** Keeps an error of the page's own code where the tests look (`errors.js`), and logs it. */
function reportError(e) {
  window.weirErrors?.push(String(e?.stack ?? e));
  console.error(e);
}
export const post = (path, body) => request("POST", path, body);

/**
 * Reads `path` as Server-Sent Events until `stop()`: `onEvent(type, data, id)` for each event,
 * `onState("live" | "retrying" | "refused", detail)` as the connection changes. Reconnects
 * after a break (1 s, growing to 5 s), with `Last-Event-ID` when the stream gave ids; a 4xx
 * answer other than 408/429 is not retried (`refused`, with the server's message). A stream
 * silent for `idleMs` (a connection that died without closing) is dropped and reopened.
 */
export function stream(path, onEvent, onState, { idleMs = 45000 } = {}) {
  let abort = new AbortController();
  let lastId = null;
  let delay = 1000;
  let stopped = false;

  async function once() {
    abort = new AbortController();
    const extra = { Accept: "text/event-stream" };
    if (lastId !== null) extra["Last-Event-ID"] = lastId;
    const response = await fetch(path, { headers: headers(extra), signal: abort.signal, cache: "no-store" });
    if (!response.ok) {
      let message = `HTTP ${response.status}`;
      try {
        message = (await response.json()).message ?? message;
      } catch {
        /* not JSON */
      }
      const error = new ApiError(response.status, "refused", message);
      throw error;
    }
    onState("live");
    delay = 1000;
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let idle;
    const quiet = () => {
      clearTimeout(idle);
      const mine = abort;
      idle = setTimeout(() => mine.abort(), idleMs);
    };
    for (;;) {
      quiet();
      let chunk;
      try {
        chunk = await reader.read();
      } finally {
        clearTimeout(idle);
      }
      const { value, done } = chunk;
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let type = "message";
        let id = null;
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const v = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") type = v;
          else if (field === "data") data.push(v);
          else if (field === "id") id = v;
        }
        if (id !== null) lastId = id;
        if (!data.length) continue;
        let parsed;
        try {
          parsed = JSON.parse(data.join("\n"));
        } catch {
          parsed = data.join("\n");
        }
        try {
          onEvent(type, parsed, id);
        } catch (e) {
          // A page's bug must not pass for a broken connection (and skip the event on resume).
          reportError(e);
        }
      }
    }
  }

  (async () => {
    while (!stopped) {
      try {
        await once();
        if (stopped) return;
        onState("retrying", "the stream ended");
      } catch (e) {
        if (stopped) return;
        if (e instanceof ApiError && e.status >= 400 && e.status < 500 && e.status !== 408 && e.status !== 429) {
          onState("refused", e.message, e.status);
          return;
        }
        onState("retrying", e instanceof ApiError ? e.message : "weir does not answer");
      }
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 5000);
    }
  })();

  return {
    stop() {
      stopped = true;
      abort.abort();
    },
  };
}
