// pgws.js: the JavaScript client of pgws. An ES module with no dependency and no build step,
// served by pgws itself at /pgws.js (with CORS, so a page of any origin may import it):
//
//   import { connect } from "https://pgws.example.com/pgws.js";
//   const conn = connect({ channel: "chat", token: () => fetch("/token").then(r => r.text()) });
//   conn.on("message", (text, info) => show(text, info.seq));
//   conn.send("hello");
//
// What it does, and the wire details it relies on (README "The JavaScript client"):
// - The token never goes into the URL, where proxies log it: the socket offers the subprotocols
//   ["pgws", "pgws.bearer.<jwt>"] and opens /<channel> (or / when the token's claims choose).
// - pgws's own messages are binary frames of UTF-8 JSON; relayed messages are text frames.
//   With the journal on, a journaled channel gives {"event":"stream","channel","epoch","seq"}
//   at open (with "recovered" after a resume), and {"channel","seq"} before each journaled
//   text frame. The client keeps the last position of each channel, resumes from it with
//   ?resume={"<channel>":[seq,"<epoch>"]} after a reconnect, and drops a journaled message it
//   has already delivered: each one reaches the application once, in order.
// - It reconnects with exponential back-off and jitter, except after close(), after the codes
//   in NO_RECONNECT, after 3001 (expired) when no token callback can give a fresh token, and
//   after too many attempts in a row that failed (an opening handshake, or the token callback
//   throwing). A fixed token whose exp is past, or a callback that returns no JWT, ends it at once.
// - A token callback is asked for a new token before `exp` (sent as {"refresh": "<jwt>"},
//   answered by {"refreshed": ...}), for a fresh one before reconnecting after 3001, and after
//   two failed opening handshakes in a row (a browser cannot see why a handshake failed).
// - Plain (not journaled) channels lose what was sent while the client was away: each reconnect
//   emits a "gap" with source "disconnected" for them.
// - send() while not open queues the text (bounded by maxQueue, flushed in order at the next
//   open); past the bound it throws; what the queue still holds when the connection ends for
//   good is handed back (close() returns it, the last "close" event carries it). Nothing is
//   dropped without the application being told.

export const VERSION = "0.1.0";

const SUBPROTOCOL = "pgws";
const BEARER = "pgws.bearer.";

// Close codes after which reconnecting would only repeat the failure: 1002 and 1003 (the client
// spoke the protocol wrongly), 1007 (text that is not UTF-8). 4000-4999 are the application's.
const NO_RECONNECT = new Set([1002, 1003, 1007]);
const EXPIRED = 3001;
// Codes that say something went wrong on the server's side (the socket reconnects): each is
// also reported as an "error" event, with pgws's reason (1011/1013 say how many were not sent).
const SERVER_TROUBLE = new Set([1008, 1009, 1011, 1013]);

const DEFAULTS = {
  url: null,             // ws(s):// base; default: the pgws that served this file
  channel: null,         // the channel to open; null: the token's channel/channels claims
  token: null,           // a JWT string, or a function returning one (or a Promise of one)
  positions: null,       // {"<channel>": [seq, "<epoch>"]}: resume from these at the first open
  history: 0,            // at the first open, the last N messages of channels with no position
  minDelay: 500,         // ms: first reconnect delay (before jitter)
  maxDelay: 30000,       // ms: the longest reconnect delay
  stableAfter: 5000,     // ms open after which the back-off starts again from minDelay
  maxFailedOpens: 10,    // attempts in a row that fail before giving up (Infinity: never)
  maxQueue: 1000,        // texts send() may queue while not open
  refreshMargin: 30,     // s before exp to ask for a new token (at most half the token's life)
};

export class PgwsError extends Error {
  constructor(message) {
    super("pgws: " + message);
    this.name = "PgwsError";
  }
}

/** Opens a connection (asynchronously: handlers registered right after this call see everything). */
export function connect(options) {
  return new Connection(options);
}

// The claims of a JWT, unverified (only the server can verify it): for its exp.
function claimsOf(token) {
  try {
    let b64 = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    while (b64.length % 4) b64 += "=";
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === "object" ? claims : {};
  } catch (e) {
    return {};
  }
}

function expOf(token) {
  const exp = claimsOf(token).exp;
  return typeof exp === "number" && isFinite(exp) ? exp : null;
}

function defaultBase() {
  const base = new URL(".", import.meta.url);
  base.protocol = base.protocol === "https:" ? "wss:" : "ws:";
  return base.href;
}

export class Connection {
  constructor(options) {
    const o = Object.assign({}, DEFAULTS, options || {});
    if (typeof o.token !== "string" && typeof o.token !== "function") {
      throw new PgwsError("the token option must be a JWT or a function that returns one");
    }
    this._o = o;
    this._source = typeof o.token === "function" ? o.token : null;
    this._token = typeof o.token === "string" ? o.token : null;
    this._handlers = new Map();
    this._queue = [];
    this._streams = new Map();  // channel -> {epoch, position, last}
    for (const [channel, pos] of Object.entries(o.positions || {})) {
      if (Array.isArray(pos) && typeof pos[0] === "number" && typeof pos[1] === "string") {
        this._streams.set(channel, { epoch: pos[1], position: pos[0], last: pos[0] });
      }
    }
    this._ws = null;
    this._state = "connecting";
    this._closing = false;    // close() was called, or the client ends for good (_end)
    this._why = null;         // why it ends, for the last close event
    this._unsent = [];        // what close() took from the queue (and returned)
    this._first = true;
    this._step = 0;          // back-off step
    this._failedOpens = 0;   // attempts in a row that failed (handshakes, token callback)
    this._failedAsks = 0;    // how many of those were the token callback throwing
    this._opens = 0;
    this._timers = {};
    this._asked = new Map();  // channel -> [seq, epoch] this socket asked to resume after
    this._pending = null;     // the {"channel","seq"} frame announcing the next text frame
    this._newToken = null;    // a refresh sent, not answered yet
    this._renew = "connect";  // why the callback is asked next: connect, expired, failed-opens
    this._timer("open", 0, () => this._open());
  }

  /** "connecting", "open", "waiting" (to reconnect) or "closed" (for good). */
  get state() {
    return this._state;
  }

  /** The last position of each journaled channel: {"<channel>": [seq, "<epoch>"]}. */
  get positions() {
    const out = {};
    for (const [channel, s] of this._streams) out[channel] = [s.position, s.epoch];
    return out;
  }

  /** How many texts wait for the connection. */
  get queued() {
    return this._queue.length;
  }

  on(event, handler) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(handler);
    return () => this.off(event, handler);
  }

  off(event, handler) {
    const set = this._handlers.get(event);
    if (set) set.delete(handler);
  }

  /**
   * Sends a text message. Returns true when it went to the open socket, false when it was queued
   * for the next open. Throws a PgwsError when the connection is closed for good (or closing:
   * close() was called), or when maxQueue texts already wait.
   */
  send(text) {
    if (typeof text !== "string") throw new TypeError("pgws: send() takes a string");
    if (this._state === "closed") throw new PgwsError("the connection is closed; not sent");
    if (this._closing) throw new PgwsError("the connection is closing; not sent");
    const ws = this._ws;
    if (this._state === "open" && ws && ws.readyState === WebSocket.OPEN) {
      ws.send(text);
      return true;
    }
    if (this._queue.length >= this._o.maxQueue) {
      throw new PgwsError(this._queue.length + " messages already wait for the connection " +
        "(maxQueue); not queued");
    }
    this._queue.push(text);
    return false;
  }

  /**
   * Closes for good; returns the queued texts that were never sent (the last "close" event
   * carries the same as its unsent).
   */
  close(code = 1000, reason = "closed by the application") {
    if (this._state === "closed" || this._closing) return [];
    const unsent = this._queue.splice(0);
    this._unsent = unsent.slice();
    this._end("closed by the application", code, reason, true);
    return unsent;
  }

  // Ends for good: closes the socket if there is one (the last close event follows), else at once.
  _end(why, code = 1000, reason = why, clean = false) {
    this._closing = true;
    this._why = why;
    this._clear("open", "refresh", "stable");
    const ws = this._ws;
    if (ws) {
      try { ws.close(code, reason); } catch (e) { ws.close(); }
    } else {
      this._finish({ code: clean ? code : 1006, reason, wasClean: clean, opened: false,
        unsentBytes: 0, why });
    }
  }

  // A mistake that retrying would only repeat: an "error" event, then the end.
  _fatal(kind, message, why) {
    this._error(kind, message);
    this._end(why);
  }

  // -- events -----------------------------------------------------------------------------------

  _emit(event, ...args) {
    const set = this._handlers.get(event);
    if (!set) return;
    for (const handler of [...set]) {
      try {
        handler(...args);
      } catch (e) {
        // The application's bug must not break the connection; it still reaches the console.
        setTimeout(() => { throw e; });
      }
    }
  }

  _error(kind, message, details) {
    this._emit("error", Object.assign({ kind, message }, details || {}));
  }

  _timer(name, ms, fn) {
    clearTimeout(this._timers[name]);
    this._timers[name] = setTimeout(() => { delete this._timers[name]; fn(); }, ms);
  }

  _clear(...names) {
    for (const name of names) { clearTimeout(this._timers[name]); delete this._timers[name]; }
  }

  // -- opening ----------------------------------------------------------------------------------

  async _open() {
    if (this._closing) return;
    this._state = "connecting";
    const exp = this._token === null ? null : expOf(this._token);
    if (!this._source && exp !== null && exp <= Date.now() / 1000) {
      // By this browser's clock; pgws would refuse it (401) at every attempt.
      this._fatal("token", "the token expired (its exp, " + exp + ", is past) and no token " +
        "callback renews it", "the token expired and no callback renews it");
      return;
    }
    if (this._source && (this._token === null || (exp !== null && exp - Date.now() / 1000 < 1))) {
      const asked = await this._ask(this._token !== null ? "expired" : this._renew);
      if (this._closing) return;  // close() was called meanwhile, and has finished
      if (asked.failed) {  // threw or rejected (e.g. the token endpoint is down): a failed attempt
        this._error("token", "the token callback failed: " + asked.message, { error: asked.error });
        this._failedOpens += 1;
        this._failedAsks += 1;
        this._retry({ code: 1006, reason: "the token callback failed", wasClean: false,
          opened: false, unsentBytes: 0 });
        return;
      }
      if (asked.bad) {
        this._fatal("token", asked.message, "the token callback gave no JWT");
        return;
      }
      this._token = asked.token;
    }
    let ws;
    try {
      ws = new WebSocket(this._url(), [SUBPROTOCOL, BEARER + this._token]);
    } catch (e) {  // a malformed URL or token
      this._error("connect", e.message, { error: e });
      this._finish({ code: 1006, reason: e.message, wasClean: false, opened: false, unsentBytes: 0 });
      return;
    }
    ws.binaryType = "arraybuffer";
    this._ws = ws;
    this._pending = null;
    ws.onopen = () => this._opened(ws);
    ws.onmessage = (ev) => { if (ws === this._ws) this._message(ev.data); };
    ws.onclose = (ev) => this._closed(ws, ev);
    ws.onerror = () => {};  // a close event follows, with the code
  }

  // Asks the token callback: {token}, {failed, error, message} when it threw or rejected, or
  // {bad, message} when it gave something that is not a non-empty string (a programming error).
  async _ask(reason) {
    let token;
    try {
      token = await this._source({ reason });
    } catch (e) {
      return { failed: true, error: e, message: e instanceof Error ? e.message : String(e) };
    }
    if (typeof token !== "string" || !token) {
      return { bad: true, message: "the token callback gave no JWT (" +
        (typeof token === "string" ? "an empty string" : typeof token) + "); it must return " +
        "a non-empty string, or throw or reject when it cannot" };
    }
    return { token };
  }

  _url() {
    const url = new URL(this._o.url || defaultBase(), typeof location === "undefined" ? undefined
      : location.href);
    if (url.protocol === "http:") url.protocol = "ws:";
    if (url.protocol === "https:") url.protocol = "wss:";
    if (!url.pathname.endsWith("/")) url.pathname += "/";
    if (this._o.channel) url.pathname += encodeURIComponent(this._o.channel);
    this._asked = new Map();
    const resume = {};
    for (const [channel, s] of this._streams) {
      resume[channel] = [s.position, s.epoch];
      this._asked.set(channel, [s.position, s.epoch]);
    }
    const query = url.search.length > 1 ? [url.search.slice(1)] : [];  // the url option's own
    if (this._asked.size) query.push("resume=" + encodeURIComponent(JSON.stringify(resume)));
    if (this._first && this._o.history > 0) query.push("history=" + Math.floor(this._o.history));
    url.search = query.length ? "?" + query.join("&") : "";
    return url.href;
  }

  _opened(ws) {
    if (ws !== this._ws) return;
    this._state = "open";
    this._first = false;
    this._failedOpens = 0;
    this._failedAsks = 0;
    this._opens += 1;
    this._timer("stable", this._o.stableAfter, () => { this._step = 0; });
    if (ws.protocol !== SUBPROTOCOL) {
      this._error("protocol", "the server did not answer the pgws subprotocol (positions and " +
        "control messages are unavailable)");
    }
    this._emit("open", { reconnected: this._opens > 1, protocol: ws.protocol });
    if (this._opens > 1) {
      // Plain NOTIFYs sent while the client was away reached no one (journaled channels resume).
      const channels = this._channels();
      const plain = channels === null ? null : channels.filter((c) => !this._streams.has(c));
      if (plain === null || plain.length) {
        this._emit("gap", { source: "disconnected", channels: plain });
      }
    }
    // What was queued goes first, in order, before anything sent from now on.
    while (this._queue.length && ws.readyState === WebSocket.OPEN) ws.send(this._queue.shift());
    this._scheduleRefresh();
  }

  // The socket's channels, as pgws chooses them (README "Tokens"): the token's channel claim, else
  // the channel option, else the token's channels claim; null when unknown.
  _channels() {
    const claims = claimsOf(this._token || "");
    if (typeof claims.channel === "string") return [claims.channel];
    if (this._o.channel) return [this._o.channel];
    const list = claims.channels;
    if (Array.isArray(list) && list.length && list.every((c) => typeof c === "string")) {
      return [...new Set(list)];
    }
    return null;
  }

  // -- receiving --------------------------------------------------------------------------------

  _message(data) {
    if (typeof data === "string") {
      const announced = this._pending;
      this._pending = null;
      if (announced) this._journaled(announced, data);
      else this._emit("message", data, { journaled: false, channel: null, seq: null, epoch: null });
      return;
    }
    let obj = null;
    try { obj = JSON.parse(new TextDecoder().decode(data)); } catch (e) { /* reported below */ }
    if (!obj || typeof obj !== "object") {
      this._error("protocol", "a binary frame that is not a JSON object");
    } else if (obj.event === "stream") {
      this._stream(obj);
    } else if (obj.event === "gap") {
      this._emit("gap", { source: "listen", at: obj.at });
    } else if ("refreshed" in obj) {
      this._refreshed(obj);
    } else if (obj.event === undefined && typeof obj.channel === "string" &&
               typeof obj.seq === "number") {
      this._pending = obj;
    } else {
      this._emit("control", obj);  // pgws's other messages (presence ...)
    }
  }

  _stream(obj) {
    const channel = obj.channel;
    const asked = this._asked.get(channel) || null;
    const info = { channel, epoch: obj.epoch, seq: obj.seq };
    if (obj.recovered === true && asked) {
      // What was sent after our position comes first, then live messages after obj.seq.
      this._streams.set(channel, { epoch: obj.epoch, position: asked[0], last: asked[0] });
      this._emit("recovered", Object.assign(info, { recovered: true, from: asked[0] }));
      return;
    }
    this._streams.set(channel, { epoch: obj.epoch, position: obj.seq, last: null });
    if (obj.recovered === false) {
      Object.assign(info, { recovered: false, from: asked ? asked[0] : null,
        fromEpoch: asked ? asked[1] : null });
      this._emit("recovered", info);
      this._emit("gap", Object.assign({ source: "journal" }, info));
    } else {
      this._emit("stream", info);
    }
  }

  _journaled(announced, text) {
    const channel = announced.channel;
    const seq = announced.seq;
    let s = this._streams.get(channel);
    if (!s) {
      s = { epoch: "", position: seq, last: null };
      this._streams.set(channel, s);
    }
    if (s.last !== null && seq <= s.last) return;  // delivered already (never twice)
    if (s.last !== null && seq > s.last + 1) {
      this._emit("gap", { source: "sequence", channel, epoch: s.epoch, from: s.last, seq });
    }
    s.last = seq;
    s.position = seq;
    this._emit("message", text, { journaled: true, channel, seq, epoch: s.epoch });
  }

  // -- token refresh ----------------------------------------------------------------------------

  _scheduleRefresh() {
    this._clear("refresh");
    const exp = this._source ? expOf(this._token) : null;
    if (exp === null) return;
    const left = exp - Date.now() / 1000;
    const margin = Math.min(this._o.refreshMargin, left / 2);
    this._timer("refresh", Math.max(0, (left - margin) * 1000), () => this._refresh());
  }

  async _refresh() {
    const ws = this._ws;
    const asked = await this._ask("refresh");
    if (this._closing) return;
    if (asked.failed) {
      // The socket closes with 3001 at exp; the callback is asked again before reconnecting.
      this._error("refresh", "the token callback failed: " + asked.message, { error: asked.error });
      return;
    }
    if (asked.bad) {
      this._fatal("token", asked.message, "the token callback gave no JWT");
      return;
    }
    const token = asked.token;
    if (ws !== this._ws || !ws || ws.readyState !== WebSocket.OPEN) {
      this._token = token;  // for the next open
      return;
    }
    this._newToken = token;
    ws.send(new TextEncoder().encode(JSON.stringify({ refresh: token })));
  }

  _refreshed(obj) {
    const token = this._newToken;
    this._newToken = null;
    if (obj.refreshed !== true || token === null) {
      this._error("refresh", "pgws refused the new token: " + (obj.reason || "no reason given"),
        { reason: obj.reason });
      return;
    }
    const before = expOf(this._token);
    this._token = token;
    this._emit("refresh", { exp: obj.exp === undefined ? null : obj.exp });
    const after = expOf(token);
    if (after !== null && before !== null && after <= before) {
      this._error("refresh", "the token callback gave a token that expires no later than the " +
        "last one; not asking again before it expires");
      return;
    }
    this._scheduleRefresh();
  }

  // -- closing and reconnecting -----------------------------------------------------------------

  _closed(ws, ev) {
    if (ws !== this._ws) return;
    this._ws = null;
    this._pending = null;
    this._newToken = null;
    this._clear("refresh", "stable");
    const opened = this._state === "open";
    const info = { code: ev.code, reason: ev.reason, wasClean: ev.wasClean, opened,
      unsentBytes: ws.bufferedAmount };
    if (!opened) this._failedOpens += 1;
    if (SERVER_TROUBLE.has(ev.code)) this._error("closed", ev.reason || "closed " + ev.code, info);
    let why = null;  // why not to reconnect
    if (this._closing) why = this._why;
    else if (NO_RECONNECT.has(ev.code) || (ev.code >= 4000 && ev.code <= 4999)) why = "close code";
    else if (ev.code === EXPIRED && !this._source) why = "the token expired and no callback renews it";
    if (why !== null) {
      this._finish(Object.assign(info, { why }));
      return;
    }
    if (ev.code === EXPIRED) {
      this._token = null;  // the callback gives a fresh one first
      this._renew = "expired";
      this._reconnect(info, 0);
      return;
    }
    // A handshake that failed twice may be the token's fault (the browser cannot see a 401 or
    // 403, nor tell them from a server that is down): a callback is asked for a fresh one.
    if (this._source && this._failedOpens >= 2) {
      this._token = null;
      this._renew = "failed-opens";
    }
    this._retry(info);
  }

  // After a failed attempt (or a close): gives up after maxFailedOpens in a row, else backs off.
  _retry(info) {
    if (this._failedOpens >= this._o.maxFailedOpens) {
      const n = this._failedOpens;
      const asks = this._failedAsks;
      const why = asks === 0 ? n + " opening handshakes in a row failed"
        : n + " attempts in a row failed (" + (n - asks) + " opening handshakes, " + asks +
          " token callback calls)";
      this._error("connect", "giving up: " + why + "; the server may be down or unreachable, " +
        "or refuse the token or the channel (a browser cannot tell which)", { attempts: this._failedOpens });
      this._finish(Object.assign(info, { why }));
      return;
    }
    const full = Math.min(this._o.maxDelay, this._o.minDelay * Math.pow(2, this._step));
    this._step += 1;
    this._reconnect(info, Math.round(full / 2 + Math.random() * full / 2));  // "equal jitter"
  }

  _reconnect(info, delay) {
    this._state = "waiting";
    this._emit("close", Object.assign(info, { reconnect: true, delay }));
    this._timer("open", delay, () => this._open());
  }

  _finish(info) {
    this._state = "closed";
    this._ws = null;
    this._clear("open", "refresh", "stable");
    const unsent = this._unsent.concat(this._queue.splice(0));
    this._unsent = [];
    this._emit("close", Object.assign(info, { reconnect: false, unsent }));
  }
}
