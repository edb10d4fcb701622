// The HTTP/JSON API: one POST per RPC, login by cookie, CSRF header on every POST.

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message || code || `HTTP ${status}`);
    this.status = status;
    this.code = code || "";
    this.details = details || [];
  }
}

function csrf() {
  for (const part of document.cookie.split(";")) {
    const [name, ...rest] = part.trim().split("=");
    if (name === "shoal_csrf") return decodeURIComponent(rest.join("="));
  }
  return "";
}

let onUnauthenticated = () => {};
export function whenUnauthenticated(fn) {
  onUnauthenticated = fn;
}

async function post(path, body, { quiet401 = false } = {}) {
  const headers = { "Content-Type": "application/json" };
  const token = csrf();
  if (token) headers["X-CSRF-Token"] = token;
  const res = await fetch(path, {
    method: "POST",
    headers,
    body: JSON.stringify(body || {}),
    credentials: "same-origin",
  });
  return answer(res, quiet401);
}

async function answer(res, quiet401) {
  let data = null;
  const text = await res.text();
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!res.ok) {
    const err = new ApiError(res.status, data?.code, data?.message, data?.details);
    if (res.status === 401 && !quiet401) onUnauthenticated(err);
    throw err;
  }
  return data || {};
}

/** Calls `shoal.v1.<service>/<method>` with a JSON body (protobuf JSON mapping). */
export function call(service, method, body) {
  return post(`/api/shoal.v1.${service}/${method}`, body);
}

export const login = (token) => post("/api/login", { token }, { quiet401: true });
export const logout = () => post("/api/logout", {});

export async function whoami() {
  const res = await fetch("/api/whoami", { credentials: "same-origin" });
  return answer(res, true);
}

/** The URL of the live event stream for WatchRequest fields `params`. */
export function eventsUrl(params) {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value === undefined || value === null || value === "" || value === false) continue;
    for (const v of Array.isArray(value) ? value : [value]) q.append(key, String(v));
  }
  const s = q.toString();
  return s ? `/api/events?${s}` : "/api/events";
}
