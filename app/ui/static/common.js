// Helpers both dashboard pages use. API data only ever reaches the page as textContent.
//
// API keys: a server that requires them (DISTILL_AUTH=required) answers 401 without
// `Authorization: Bearer <key>`. The key typed into the header's "API key" field is kept in
// sessionStorage (gone with the browser session, never in localStorage) and sent with every call:
// JSON calls (`api`), downloads (`download`: fetched, then saved from a blob, since a plain link
// cannot carry the header) and the job's server-sent events (`eventStream`: read over fetch, since
// an EventSource cannot send headers either). With authentication off no key is needed.
"use strict";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const KEY_STORAGE = "distill.apiKey";
// A key goes into an HTTP header: printable ASCII, no spaces (they look like dsk_<prefix>_<secret>).
const KEY_PATTERN = /^[\x21-\x7e]+$/;
// The key when sessionStorage is not available (e.g. storage disabled): this page only.
let memoryKey = "";
const keyListeners = [];

// An element with attributes and children (strings become text nodes, never markup).
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "className") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function getKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return memoryKey;
  }
}

function storeKey(key) {
  memoryKey = key;
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // No sessionStorage: the key lasts as long as this page.
  }
}

// Called (with no arguments) after a key was saved or forgotten: the page loads its data again.
function onKeyChange(listener) {
  keyListeners.push(listener);
}

// fetch's init with the key's Authorization header added, when a key is set.
function withKey(init) {
  const headers = new Headers((init && init.headers) || {});
  const key = getKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  return { ...init, headers };
}

// A failed API call: `status`, the problem's `code` and `detail` (RFC 9457 problem+json).
class ApiError extends Error {
  constructor(status, code, detail) {
    super(`${status}: ${detail}`);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
}

async function apiError(response) {
  const type = response.headers.get("content-type") || "";
  let body = null;
  try {
    body = type.includes("json") ? await response.json() : await response.text();
  } catch {
    // An unreadable body: the status text says what there is to say.
  }
  const problem = body && typeof body === "object" ? body : {};
  const detail = problem.detail || problem.title || (typeof body === "string" && body) || response.statusText;
  return new ApiError(response.status, typeof problem.code === "string" ? problem.code : null, String(detail));
}

// The key worked (or none was needed): no more "needs a key" marks.
function keyAccepted() {
  if (document.body.dataset.auth !== "needed") return;
  delete document.body.dataset.auth;
  const input = document.getElementById("api-key");
  if (input) input.removeAttribute("aria-invalid");
}

// An API call: the JSON body, or an ApiError holding the problem+json detail.
async function api(path, options) {
  const response = await fetch(path, withKey(options));
  if (!response.ok) throw await apiError(response);
  keyAccepted();
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

// The file name in a Content-Disposition header (RFC 6266: filename*= preferred), or null.
function filenameFrom(disposition) {
  if (!disposition) return null;
  let name = null;
  const extended = /filename\*\s*=\s*([^']*)'[^']*'([^;\s]+)/i.exec(disposition);
  if (extended) {
    try {
      name = decodeURIComponent(extended[2]);
    } catch {
      name = null;
    }
  }
  if (!name) {
    const plain = /filename\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]+))/i.exec(disposition);
    if (plain) name = plain[1] !== undefined ? plain[1].replace(/\\(.)/g, "$1") : plain[2];
  }
  // A name, never a path.
  return name ? name.replace(/[/\\]/g, "_") : null;
}

// Download `url` with the key, saved under the server's file name (Content-Disposition) or
// `fallbackName`: fetched, then handed to the browser from an object URL on a temporary
// <a download>. Returns the file name; throws an ApiError.
async function download(url, fallbackName) {
  const response = await fetch(url, withKey({}));
  if (!response.ok) throw await apiError(response);
  keyAccepted();
  const name = filenameFrom(response.headers.get("content-disposition")) || fallbackName;
  const blob = await response.blob();
  const href = URL.createObjectURL(blob);
  const link = el("a", { href, download: name });
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  // The browser has taken the blob once the click's download started; freed a while later.
  setTimeout(() => URL.revokeObjectURL(href), 60000);
  return name;
}

// Server-sent events read over fetch (so that the request carries the key), parsed as the WHATWG
// HTML Standard's "Server-sent events" says: lines end in CRLF, LF or CR; `field: value` (one
// space after the colon dropped); `:` starts a comment; a blank line dispatches the event built
// from the `event:` and `data:` lines since the last one; `id:` sets the last event id and
// `retry:` the reconnection time. When the connection drops (a network error, the stream ending
// without close(), nothing heard for STREAM_IDLE_MS) it reconnects after the reconnection time,
// sending `Last-Event-ID`, so the server sends only what this page has not seen; a 204 answer
// ends it. Another failed answer (401, 404, ...) ends it with onFailure(ApiError); 5xx and 429
// are retried. handlers: onEvent({type, data, lastEventId}), onState(state) with state one of
// connecting, open, reconnecting, closed, failed; onFailure(error). Returns { close() }.
const STREAM_IDLE_MS = 45000; // the server sends a comment every 15 s
const STREAM_MAX_RETRY_MS = 30000;

function eventStream(url, handlers) {
  const { onEvent, onState, onFailure } = handlers;
  let lastEventId = "";
  let retryMs = 3000; // until the server's retry: says otherwise
  let failures = 0;
  let closed = false;
  let controller = null;
  let timer = null;

  const setState = (state) => {
    if (onState) onState(state);
  };

  async function read(body, idle) {
    const reader = body.getReader();
    const decoder = new TextDecoder(); // UTF-8; a leading BOM is dropped
    let buffer = "";
    let data = "";
    let type = "";
    let idBuffer = lastEventId;

    const dispatch = () => {
      lastEventId = idBuffer;
      if (data === "") {
        type = "";
        return;
      }
      const event = { type: type || "message", data: data.slice(0, -1), lastEventId };
      data = "";
      type = "";
      if (closed) return;
      try {
        onEvent(event);
      } catch (e) {
        console.error("event handler failed", event.type, e);
      }
    };

    const line = (text) => {
      if (text === "") return dispatch();
      if (text[0] === ":") return undefined; // a comment: the keep-alive
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? "" : text.slice(colon + 1);
      if (value[0] === " ") value = value.slice(1);
      if (field === "event") type = value;
      else if (field === "data") data += `${value}\n`;
      else if (field === "id" && !value.includes("\0")) idBuffer = value;
      else if (field === "retry" && /^\d+$/.test(value)) retryMs = Number(value);
      return undefined;
    };

    const lines = (final) => {
      let start = 0;
      for (let i = 0; i < buffer.length && !closed; i += 1) {
        const c = buffer[i];
        if (c !== "\n" && c !== "\r") continue;
        // A CR at the end of a chunk may be the first half of a CRLF: wait for the next chunk.
        if (c === "\r" && i + 1 === buffer.length && !final) break;
        line(buffer.slice(start, i));
        if (c === "\r" && buffer[i + 1] === "\n") i += 1;
        start = i + 1;
      }
      buffer = buffer.slice(start);
    };

    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        buffer += decoder.decode();
        lines(true); // an event with no blank line after it is dropped, as the spec says
        return;
      }
      idle();
      buffer += decoder.decode(value, { stream: true });
      lines(false);
      if (closed) {
        await reader.cancel().catch(() => {});
        return;
      }
    }
  }

  async function connect() {
    timer = null;
    if (closed) return;
    controller = new AbortController();
    const signal = controller.signal;
    let watchdog = null;
    const idle = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => controller.abort(), STREAM_IDLE_MS);
    };
    const headers = { Accept: "text/event-stream" };
    if (lastEventId) headers["Last-Event-ID"] = lastEventId;
    setState(failures ? "reconnecting" : "connecting");
    try {
      idle();
      const response = await fetch(url, withKey({ headers, signal, cache: "no-store" }));
      if (response.status === 204) {
        closed = true;
        setState("closed");
        return;
      }
      const type = response.headers.get("content-type") || "";
      if (!response.ok || !type.startsWith("text/event-stream")) {
        const error = response.ok
          ? new ApiError(response.status, null, `not an event stream (${type || "no content type"})`)
          : await apiError(response);
        if (response.status < 500 && response.status !== 429) {
          closed = true;
          setState("failed");
          if (onFailure) onFailure(error);
          return;
        }
        throw error; // retried below
      }
      keyAccepted();
      failures = 0;
      setState("open");
      await read(response.body, idle);
    } catch (e) {
      // Dropped: a network error, the watchdog's abort, a 5xx. close()'s abort ends it below.
      if (!closed) console.debug("event stream dropped", e);
    } finally {
      clearTimeout(watchdog);
    }
    if (closed) {
      setState("closed");
      return;
    }
    // The connection ended without close() (the server went away): reconnect, as an
    // EventSource does, later each time it fails in a row.
    failures += 1;
    setState("reconnecting");
    timer = setTimeout(connect, Math.min(retryMs * 2 ** (failures - 1), STREAM_MAX_RETRY_MS));
  }

  // Handlers are never called before this returns.
  queueMicrotask(connect);
  return {
    close() {
      if (closed) return;
      closed = true;
      clearTimeout(timer);
      if (controller) controller.abort();
    },
  };
}

function fmtPercent(fraction) {
  return typeof fraction === "number" ? `${(100 * fraction).toFixed(2)} %` : "–";
}

function fmtNumber(value, digits) {
  if (typeof value !== "number") return "–";
  return value.toLocaleString("en-US", { maximumFractionDigits: digits === undefined ? 2 : digits });
}

function fmtBytes(bytes) {
  if (typeof bytes !== "number") return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

function fmtTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

function badge(status) {
  return el("span", { className: `badge ${status}` }, status);
}

// Whether `error` is a 401: the server wants a (valid) key.
function needsKey(error) {
  return error instanceof ApiError && error.status === 401;
}

// An error shown as text. A 401 says that the server needs a key (with the problem's detail)
// and puts the cursor in the key field.
function showError(node, error) {
  delete node.dataset.code;
  if (needsKey(error)) {
    const lead = getKey()
      ? "The server did not accept this API key: enter another one above and save it."
      : "The server needs an API key: enter one above and save it.";
    node.textContent = `${lead}\n${error.code || "unauthorized"}: ${error.detail}`;
    node.dataset.code = error.code || "unauthorized";
    document.body.dataset.auth = "needed";
    const input = document.getElementById("api-key");
    if (input) {
      input.setAttribute("aria-invalid", "true");
      input.focus();
    }
  } else {
    node.textContent = error instanceof Error ? error.message : String(error);
  }
  node.hidden = false;
}

function hideError(node) {
  node.hidden = true;
  node.textContent = "";
  delete node.dataset.code;
}

// The header's key form: save (sessionStorage), forget; either one reloads the page's data.
function setUpKeyForm() {
  const form = document.getElementById("key-form");
  if (!form) return;
  const input = document.getElementById("api-key");
  const state = document.getElementById("key-state");
  const forget = document.getElementById("key-forget");
  const show = (note) => {
    const key = getKey();
    input.value = key;
    forget.disabled = !key;
    state.textContent = note || (key ? "saved for this session" : "");
  };
  const changed = (note) => {
    input.removeAttribute("aria-invalid");
    show(note);
    for (const listener of keyListeners) listener();
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) {
      storeKey("");
      changed("no key");
      return;
    }
    if (!KEY_PATTERN.test(key)) {
      state.textContent = "A key has no spaces and only ASCII letters, digits and signs.";
      input.setAttribute("aria-invalid", "true");
      input.focus();
      return;
    }
    storeKey(key);
    changed();
  });
  forget.addEventListener("click", () => {
    storeKey("");
    changed("forgotten");
  });
  show();
}

setUpKeyForm();
