// A small browser client for the NoETL edge gateway (ES module, no dependencies, no build
// step): login / validate / logout, GraphQL, running a playbook, and the `/events` stream
// with lossless resume (`Last-Event-ID`). Types: gateway.d.ts; guide: README.md; the wire
// contract it speaks: docs/PROTOCOL.md, docs/openapi.json, docs/schema.graphql.
//
// Everything goes to the edge (never the origin): `credentials: 'include'` on every call,
// since the edge's CORS answer names the page's origin and allows credentials.
//
// The SSE stream is authenticated by the `session_token` cookie: the gateway's login answers
// the token in JSON and sets no cookie, so `login` stores it as a cookie for the page's own
// host (option `cookie`, on in a browser); cookies are not scoped by port, so the browser
// sends it to an edge on the same host with `new EventSource(url, {withCredentials: true})`.
// Where the edge is on another host, use `eventsUrl({ticket})` with `ticket()` instead.

/** The executePlaybook mutation (as tests/src/harness/flows.rs sends it). */
export const EXECUTE_PLAYBOOK = `mutation($path: String!, $workload: JSON, $clientId: String) {
  executePlaybook(path: $path, workload: $workload, clientId: $clientId) { id executionId requestId name status } }`;

/** The SSE event names the gateway sends (PROTOCOL.md §3). */
export const EVENTS = [
  'message', 'ping', 'playbook/state', 'playbook/progress', 'playbook/result',
  'stream/reset', 'stream/evicted', 'stream/unavailable',
];

/** An error the gateway answered: `code` is its machine code (or GraphQL `extensions.code`). */
export class GatewayError extends Error {
  constructor(code, message, status = 0) {
    super(message);
    this.name = 'GatewayError';
    this.code = code;
    this.status = status;
  }
}

const LOOPBACK = ['127.0.0.1', 'localhost'];

/**
 * The edge URL to use from this page: the configured one, except that a loopback edge is
 * reached under the same loopback name as the page (localhost vs 127.0.0.1), so the
 * session cookie, which belongs to a host name, goes along.
 */
export function resolveEdgeUrl(configured, page = globalThis.location) {
  const url = new URL(configured);
  if (page && LOOPBACK.includes(url.hostname) && LOOPBACK.includes(page.hostname)) {
    url.hostname = page.hostname;
  }
  return url.origin;
}

async function readJson(resp) {
  const text = await resp.text();
  try {
    return text ? JSON.parse(text) : null;
  } catch {
    return { error: { code: 'not_json', message: text.slice(0, 200) } };
  }
}

function errorOf(resp, body) {
  const e = body && body.error;
  if (e && typeof e === 'object') {
    return new GatewayError(e.code || `http_${resp.status}`, e.message || resp.statusText, resp.status);
  }
  return new GatewayError(`http_${resp.status}`, `HTTP ${resp.status} ${resp.statusText}`, resp.status);
}

/** Calls to the edge with the session of the logged-in user. */
export class Gateway {
  /**
   * @param {string} edgeUrl the edge's origin, e.g. `https://gateway.example.com`
   * @param {{cookie?: boolean, fetch?: typeof fetch}} [options] `cookie`: store the session
   *   token as the `session_token` cookie on login (default: when `document` exists);
   *   `fetch`: the fetch to use (default: the global one)
   */
  constructor(edgeUrl, options = {}) {
    this.edgeUrl = edgeUrl.replace(/\/+$/, '');
    this.session = null; // {token, user, expiresAt}
    this.cookie = options.cookie ?? typeof document !== 'undefined';
    this.fetch = options.fetch ?? ((input, init) => globalThis.fetch(input, init));
  }

  /** One call to the edge; the parsed JSON answer, or a GatewayError. */
  async request(path, { method = 'POST', body } = {}) {
    const headers = {};
    if (body !== undefined) headers['content-type'] = 'application/json';
    if (this.session) headers.authorization = `Bearer ${this.session.token}`;
    let resp;
    try {
      resp = await this.fetch(this.edgeUrl + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        credentials: 'include',
      });
    } catch (e) {
      throw new GatewayError('network', `the gateway at ${this.edgeUrl} cannot be reached (${e.message})`);
    }
    const data = await readJson(resp);
    if (!resp.ok) throw errorOf(resp, data);
    return data;
  }

  /** `POST /api/auth/login` with an ID token; keeps the session and stores its cookie. */
  async login(idToken) {
    const v = await this.request('/api/auth/login', { body: { auth0_token: idToken } });
    if (!v || typeof v.session_token !== 'string') {
      throw new GatewayError('bad_login_reply', 'the login reply has no session_token');
    }
    this.session = { token: v.session_token, user: v.user, expiresAt: v.expires_at };
    if (this.cookie) setSessionCookie(v.session_token, v.expires_at);
    return v;
  }

  /**
   * `POST /api/auth/validate` for the current session (or `token`): the `{valid, user,
   * expires_at}` answer; a refused session is a GatewayError with status 401.
   */
  async validate(token = this.session && this.session.token) {
    return this.request('/api/auth/validate', { body: { session_token: token || '' } });
  }

  /** `POST /api/auth/logout`, then forgets the session and its cookie. */
  async logout() {
    try {
      if (this.session) await this.request('/api/auth/logout');
    } finally {
      this.session = null;
      if (this.cookie) clearSessionCookie();
    }
  }

  /** `POST /api/events/ticket`: a 30-second, single-use ticket for `eventsUrl({ticket})`. */
  async ticket() {
    const v = await this.request('/api/events/ticket');
    return v.ticket;
  }

  /** `POST /graphql`; the whole reply (`{data, errors}`). */
  async graphql(query, variables = {}) {
    return this.request('/graphql', { body: { query, variables } });
  }

  /** Runs `path` for `clientId`; the ExecuteResult, or a GatewayError with the GraphQL code. */
  async executePlaybook(path, workload, clientId) {
    const v = await this.graphql(EXECUTE_PLAYBOOK, { path, workload, clientId });
    const err = v && Array.isArray(v.errors) && v.errors[0];
    if (err) {
      throw new GatewayError((err.extensions && err.extensions.code) || 'GRAPHQL_ERROR', err.message);
    }
    if (!v || !v.data || !v.data.executePlaybook) {
      throw new GatewayError('GRAPHQL_ERROR', 'executePlaybook returned nothing');
    }
    return v.data.executePlaybook;
  }

  /**
   * The `/events` URL for a (re)connection: `clientId` resumes that client, `lastEventId`
   * the frame after it, `ticket` authenticates without a cookie.
   */
  eventsUrl(clientId, lastEventId, { ticket } = {}) {
    const url = new URL(`${this.edgeUrl}/events`);
    if (clientId) url.searchParams.set('client_id', clientId);
    if (lastEventId) url.searchParams.set('last_event_id', lastEventId);
    if (ticket) url.searchParams.set('ticket', ticket);
    return url.toString();
  }
}

function setSessionCookie(token, expiresAt) {
  let attrs = 'Path=/; SameSite=Strict';
  const until = Date.parse(expiresAt);
  if (Number.isFinite(until)) attrs += `; Expires=${new Date(until).toUTCString()}`;
  document.cookie = `session_token=${encodeURIComponent(token)}; ${attrs}`;
}

function clearSessionCookie() {
  document.cookie = 'session_token=; Path=/; SameSite=Strict; Max-Age=0';
}

/**
 * The SSE stream of one client, kept open by the browser's own EventSource.
 *
 * EventSource reconnects by itself to the same URL with `Last-Event-ID`, and the gateway
 * makes that enough (PROTOCOL.md §3): every frame id names its client, so the retry
 * resumes the same client — even though the first URL names none — and replays what it
 * missed; while the origin is away (restarting behind the edge) the retries are answered
 * `stream/unavailable` with a 200 that ends, so EventSource keeps trying instead of
 * giving up. The page steps in only when EventSource gives up for good, which it does on
 * an error status: see `diagnose`.
 *
 * Handlers: `onState(state, info)` with state `connecting | connected | reconnecting |
 * offline | signed-out`, and `onFrame(event, data, id)`.
 */
export class EventStream {
  constructor(gateway, { onState = () => {}, onFrame = () => {} } = {}) {
    this.gw = gateway;
    this.onState = onState;
    this.onFrame = onFrame;
    this.clientId = null;
    this.lastEventId = null;
    this.es = null;
    this.timer = null;
    this.failures = 0; // consecutive failed attempts
    this.reconnects = 0; // successful reconnections since start
    this.running = false;
    this.waiters = [];
  }

  start() {
    this.stop();
    this.running = true;
    this.clientId = null;
    this.lastEventId = null;
    this.failures = 0;
    this.reconnects = 0;
    this.connect();
  }

  stop(state = 'offline') {
    this.running = false;
    clearTimeout(this.timer);
    if (this.es) this.es.close();
    this.es = null;
    this.onState(state, {});
  }

  /** Resolves with the client id once the init frame has named it. */
  clientReady(timeoutMs = 15000) {
    if (this.clientId) return Promise.resolve(this.clientId);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new GatewayError('no_stream', 'the event stream did not open')), timeoutMs);
      this.waiters.push((id) => { clearTimeout(t); resolve(id); });
    });
  }

  /**
   * Opens one EventSource. Its URL names the client and the last frame seen only when the
   * page itself opens it again after EventSource gave up (`diagnose`); the browser's own
   * retries repeat the URL and send `Last-Event-ID`.
   */
  connect() {
    this.onState(this.clientId ? 'reconnecting' : 'connecting', { attempt: this.failures + 1 });
    const es = new EventSource(this.gw.eventsUrl(this.clientId, this.lastEventId), { withCredentials: true });
    this.es = es;
    for (const name of EVENTS) {
      es.addEventListener(name, (ev) => { if (this.es === es) this.frame(name, ev); });
    }
    es.onerror = () => {
      if (this.es !== es || !this.running) return;
      this.failures += 1;
      this.onState('reconnecting', { attempt: this.failures });
      if (es.readyState === EventSource.CLOSED) {
        this.es = null;
        this.diagnose();
      }
      // Otherwise (CONNECTING) the browser retries by itself after the server's `retry:`.
    };
  }

  frame(name, ev) {
    if (ev.lastEventId) this.lastEventId = ev.lastEventId;
    let data = null;
    try {
      data = JSON.parse(ev.data);
    } catch {
      data = { unparsed: ev.data };
    }
    if (name === 'message' && data && data.result && data.result.clientId) {
      // An init frame after the first one is a reconnection (the browser's or ours).
      if (this.clientId) this.reconnects += 1;
      this.clientId = data.result.clientId;
      this.failures = 0;
      this.onState('connected', { clientId: this.clientId, reconnects: this.reconnects });
      for (const w of this.waiters.splice(0)) w(this.clientId);
    }
    this.onFrame(name, data, ev.lastEventId || null);
  }

  /** The next page-made attempt, `notBeforeMs` from now (at least 250 ms). */
  schedule(notBeforeMs = 0) {
    clearTimeout(this.timer);
    const delay = Math.max(notBeforeMs, 250);
    this.timer = setTimeout(() => { if (this.running) this.connect(); }, delay);
  }

  /**
   * EventSource gave up: the server answered an error status, which it never retries, and
   * does not say which: ask once with fetch. 401: the session is gone (stop). 403: the
   * client id is no longer ours (start as a new client). 429 (too many streams or opens
   * for this user): open again after its `Retry-After`, naming the client and the last
   * frame seen. Anything else: open again shortly.
   */
  async diagnose() {
    let status = 0;
    let retryAfterMs = 0;
    const ctl = new AbortController();
    try {
      const resp = await this.gw.fetch(this.gw.eventsUrl(this.clientId, this.lastEventId), {
        credentials: 'include',
        signal: ctl.signal,
        headers: { accept: 'text/event-stream' },
      });
      status = resp.status;
      if (status === 429) retryAfterMs = 1000 * (Number(resp.headers.get('retry-after')) || 1);
    } catch {
      status = 0;
    } finally {
      ctl.abort();
    }
    if (!this.running) return;
    if (status === 401) {
      this.stop('signed-out');
      return;
    }
    if (status === 403) {
      this.clientId = null;
      this.lastEventId = null;
      this.onFrame('stream/reset', { params: { reason: 'the client id was refused; starting a new client' } }, null);
    }
    this.schedule(Math.max(retryAfterMs, 1000 * Math.min(this.failures, 3)));
  }
}
