// The API client of the page: JSON calls with the bearer key, the one error envelope, and the
// job's event stream read with fetch (EventSource cannot send an Authorization header, and the
// key must never travel in a URL).

const KEY_STORAGE = "masactrl.apiKey";

export function savedKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function saveKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

/** A non-2xx answer: the API's code, its sentence and its field details. */
export class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || "error";
    this.details = error.details || [];
  }
}

async function failure(response) {
  let error = { message: `The gateway answered ${response.status} ${response.statusText}.` };
  try {
    const body = await response.json();
    if (body && body.error) error = body.error;
  } catch {
    // Not our envelope (a proxy's page): keep the status line.
  }
  return new ApiError(response.status, error);
}

function headers(extra = {}) {
  const key = savedKey();
  return key ? { Authorization: `Bearer ${key}`, ...extra } : extra;
}

/** Call the API; `json` is sent as the JSON body, `form` as multipart. Resolves to the body. */
export async function call(path, { method = "GET", json, form, signal } = {}) {
  const init = { method, signal, headers: headers() };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form; // the browser writes the multipart boundary
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response.status === 204 ? null : response.json();
}

/** Split a text/event-stream body into events ({event, data, id}); comments are skipped. */
export function parseEvents(buffer) {
  const events = [];
  const blocks = buffer.replace(/\r\n?/g, "\n").split("\n\n");
  const rest = blocks.pop(); // an incomplete event waits for more bytes
  for (const block of blocks) {
    const event = { event: "message", data: "", id: null };
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const name = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (name === "event") event.event = value;
      else if (name === "data") data.push(value);
      else if (name === "id") event.id = value;
    }
    if (data.length) {
      event.data = data.join("\n");
      events.push(event);
    }
  }
  return { events, rest };
}

const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

/**
 * Follow a job's events until it ends, calling `onEvent({event, data, id})` with parsed data.
 * A dropped connection is resumed after the last event seen (Last-Event-ID), as an
 * EventSource would.
 */
export async function followEvents(jobId, onEvent, { signal } = {}) {
  let lastId = null;
  for (let attempt = 0; attempt < 5; attempt += 1) {
    const extra = { Accept: "text/event-stream" };
    if (lastId) extra["Last-Event-ID"] = lastId;
    let response;
    try {
      response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events`, {
        headers: headers(extra),
        signal,
      });
    } catch (error) {
      if (signal && signal.aborted) return;
      await new Promise((resolve) => setTimeout(resolve, 1000));
      continue;
    }
    if (response.status === 204) return; // nothing follows: the job has ended
    if (!response.ok) throw await failure(response);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const parsed = parseEvents(buffer + value);
        buffer = parsed.rest;
        for (const event of parsed.events) {
          if (event.id) lastId = event.id;
          onEvent({ ...event, data: JSON.parse(event.data) });
          if (TERMINAL.has(event.event)) return;
        }
      }
    } catch (error) {
      if (signal && signal.aborted) return;
      if (error instanceof SyntaxError) throw error;
    }
  }
}
