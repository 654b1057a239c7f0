// The admin API, as the console uses it: every request goes to one node of the cluster; when
// that node stops answering, the next one it learned from cluster status takes over. The
// session is the HttpOnly cookie the node set at sign-in; writes repeat its CSRF token.

/** An answer of the API that is not a success: its status, code, message and field. */
export class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field;
  }
}

// Base URLs of the nodes (origin + path prefix, ending in '/'), the current one first.
const bases = [new URL('../', location.href).href];
let current = 0;
let csrf = '';
let requests = 0;
const listeners = [];

/** Called with the base URL whenever the console moves to another node. */
export function onMove(fn) { listeners.push(fn); }
export function currentBase() { return bases[current]; }
/** How many requests the console has made (the refresh loop paces itself by it). */
export function requestCount() { return requests; }
export function setCsrf(token) { csrf = token || ''; }

/** Remembers the members of the cluster as places to move to. */
export function learn(members) {
  for (const m of members) {
    const base = `${location.protocol}//${m.http_addr}/`;
    if (!bases.includes(base)) bases.push(base);
  }
}

/**
 * One request; `body` is sent as JSON. Resolves to the parsed answer (or null).
 * A read goes to the next node when this one does not answer in time; a write only when it
 * could not connect (so it never ran), and it carries one Idempotency-Key on every attempt.
 */
export async function api(method, path, body, { headers = {}, auth, timeoutMs = 5000 } = {}) {
  const h = { ...headers };
  const write = method !== 'GET';
  if (body !== undefined) h['content-type'] = 'application/json';
  if (write && csrf) h['x-csrf-token'] = csrf;
  if (write) h['idempotency-key'] = crypto.randomUUID();
  if (auth) h.authorization = `Bearer ${auth}`;
  let lastError;
  for (let i = 0; i < bases.length; i++) {
    const at = (current + i) % bases.length;
    let resp;
    try {
      requests++;
      resp = await fetch(`${bases[at]}v1${path}`, {
        method,
        headers: h,
        body: body === undefined ? undefined : JSON.stringify(body),
        credentials: 'include',
        cache: 'no-store',
        signal: AbortSignal.timeout(timeoutMs),
      });
    } catch (e) {
      lastError = e;
      // A timed-out write may have run: say so rather than run it on another node.
      if (write && e.name === 'TimeoutError') {
        throw new ApiError(0, 'timeout', `no answer within ${timeoutMs / 1000} s: the change may or may not have been made; check before trying again`);
      }
      continue; // the node did not answer: try the next one
    }
    if (at !== current) {
      current = at;
      listeners.forEach((fn) => fn(bases[at]));
    }
    return answer(resp);
  }
  throw new ApiError(0, 'unreachable', `no node of the cluster answers (${lastError})`);
}

/** A plain GET of another URL (a member's /v1/node), counted like the API's requests. */
export async function peek(url, timeoutMs = 2000) {
  requests++;
  const r = await fetch(url, { signal: AbortSignal.timeout(timeoutMs), cache: 'no-store' });
  return r.ok ? r.json() : null;
}

async function answer(resp) {
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (resp.ok) return data;
  const e = (data && data.error) || {};
  throw new ApiError(resp.status, e.code || String(resp.status), e.message || text || resp.statusText, e.field);
}
