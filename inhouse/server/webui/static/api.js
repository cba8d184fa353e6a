// The server's APIs as the page uses them: the key from this tab's session storage, errors in
// OpenAI's shape turned into one message a person can read (429s with their wait).

export class ApiError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

const KEY = "inhouse.apiKey";

export function savedKey() { return sessionStorage.getItem(KEY) || ""; }
export function saveKey(key) { key ? sessionStorage.setItem(KEY, key) : sessionStorage.removeItem(KEY); }

function headers(json) {
  const h = {};
  const key = savedKey();
  if (key) h.Authorization = `Bearer ${key}`;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function failure(res) {
  let message = `${res.status} ${res.statusText}`;
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status line */ }
  const wait = res.headers.get("Retry-After");
  if (res.status === 429) {
    message = `Too many requests: ${message}` + (wait ? ` Try again in ${wait} s.` : "");
  }
  return new ApiError(res.status, message, wait ? Number(wait) : null);
}

export async function call(method, path, body, { raw = false } = {}) {
  let res;
  try {
    res = await fetch(path, { method, headers: headers(body !== undefined),
                              body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError(0, "The server cannot be reached.");
  }
  if (!res.ok) throw await failure(res);
  return raw ? res : res.json();
}

// POST a streaming request and hand each server-sent event's JSON to `onEvent`.
export async function stream(path, body, signal, onEvent) {
  let res;
  try {
    res = await fetch(path, { method: "POST", headers: headers(true), body: JSON.stringify(body), signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "The server cannot be reached.");
  }
  if (!res.ok) throw await failure(res);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (data && data !== "[DONE]") onEvent(JSON.parse(data));
    }
  }
}

// Save a JSON object as a file the browser downloads.
export function download(name, obj) {
  const url = URL.createObjectURL(new Blob([JSON.stringify(obj, null, 2)], { type: "application/json" }));
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}
