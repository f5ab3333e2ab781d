/* warlock-socket.js: the browser client of Warlock's browser stream (GET /api/ws).
 *
 * Plain ES2020, no build step, no dependency. Defines the global `WarlockSocket`:
 *
 *   WarlockSocket.connect({ apiKey })            // or { getTicket: async () => "<ticket>" }
 *   WarlockSocket.isConnected()                   // true while the socket is open
 *   const off = WarlockSocket.on("metrics", (data, host) => ...)   // presence, metrics, output, commands,
 *   off()                                         //   status (connected/connecting/disconnected), error
 *   WarlockSocket.emit("ping", {}, (reply) => ...)                   // reply: ack, error or pong frame
 *   const stop = WarlockSocket.subscribe("output", { host, command_id }, (data, host) => ...)
 *   const stop2 = WarlockSocket.subscribeMetrics("web-1", (sample, host) => ...)
 *   WarlockSocket.disconnect()
 *
 * Every (re)connect asks for a new one-time ticket (POST /api/ws-tickets with the key in the
 * Authorization header: the key never goes in a URL) and opens ws(s)://<this host>/api/ws?ticket=...
 * The client reconnects by itself with capped exponential backoff and jitter (0.5 s doubling to 10 s),
 * re-sending its live subscriptions. It stops, with status "disconnected" and an "error" event, when the
 * ticket request is refused (401/403: reason "unauthorized") or the server closes with 4403 (the key was
 * revoked). 4401 (a refused ticket) just reconnects with a new ticket.
 *
 * The indicator: a fixed element at the top right, #warlock-indicator, whose data-state is connected
 * (green), connecting (yellow: an attempt in progress or waiting to retry) or disconnected (red).
 */
(function (global) {
  "use strict";

  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const ACK_TIMEOUT_MS = 15000;
  const EVENT_TOPICS = ["presence", "metrics", "output", "commands"];
  const LABELS = { connected: "Connected", connecting: "Connecting\u2026", disconnected: "Disconnected" };

  const s = {
    options: null,
    ws: null,
    status: "disconnected",
    stopped: true,
    attempt: 0,
    timer: null,
    generation: 0, // bumps on connect/disconnect: callbacks of an older socket do nothing
    nextId: 1,
    handlers: new Map(), // event -> Set of callbacks
    pending: new Map(), // id -> { ack, timer }
    subs: new Map(), // key -> { topic, host, command_id, count }
    indicator: null,
    retryAt: 0,
  };

  function fire(event, ...args) {
    const set = s.handlers.get(event);
    if (!set) return;
    for (const cb of Array.from(set)) {
      try {
        cb(...args);
      } catch (err) {
        if (global.console) global.console.error("WarlockSocket handler of", event, "failed:", err);
      }
    }
  }

  function indicator() {
    if (s.indicator && s.indicator.isConnected) return s.indicator;
    const doc = global.document;
    if (!doc || !doc.body) return null;
    let el = doc.getElementById("warlock-indicator");
    if (!el) {
      el = doc.createElement("div");
      el.id = "warlock-indicator";
      el.setAttribute("role", "status");
      el.setAttribute("aria-live", "polite");
      const dot = doc.createElement("span");
      dot.className = "warlock-dot";
      const text = doc.createElement("span");
      text.className = "warlock-text";
      el.append(dot, text);
      doc.body.appendChild(el);
    }
    s.indicator = el;
    return el;
  }

  function setStatus(status, detail) {
    const changed = status !== s.status;
    s.status = status;
    const el = indicator();
    if (el) {
      el.dataset.state = status;
      const text = el.querySelector(".warlock-text");
      if (text) text.textContent = LABELS[status] + (detail ? " (" + detail + ")" : "");
    }
    if (changed) fire("status", status, detail || null);
  }

  function failPending(code, detail) {
    const pending = Array.from(s.pending.entries());
    s.pending.clear();
    for (const [id, entry] of pending) {
      clearTimeout(entry.timer);
      try {
        entry.ack({ type: "error", id, code, detail });
      } catch (err) {
        if (global.console) global.console.error("WarlockSocket ack failed:", err);
      }
    }
  }

  async function fetchTicket() {
    const o = s.options;
    if (typeof o.getTicket === "function") return await o.getTicket();
    const apiKey = typeof o.apiKey === "function" ? o.apiKey() : o.apiKey;
    const answer = await global.fetch((o.base || "") + "/api/ws-tickets", {
      method: "POST",
      headers: { Authorization: "Bearer " + apiKey },
      cache: "no-store",
      credentials: "omit",
    });
    if (answer.status === 401 || answer.status === 403) {
      let detail = "HTTP " + answer.status;
      try {
        detail = (await answer.json()).detail || detail;
      } catch (_) {
        /* not JSON */
      }
      const err = new Error(detail);
      err.unauthorized = true;
      err.status = answer.status;
      throw err;
    }
    if (!answer.ok) throw new Error("ticket request answered HTTP " + answer.status);
    const body = await answer.json();
    return body.ticket;
  }

  function socketUrl(ticket) {
    const loc = global.location;
    const proto = loc.protocol === "https:" ? "wss:" : "ws:";
    return proto + "//" + loc.host + (s.options.base || "") + "/api/ws?ticket=" + encodeURIComponent(ticket);
  }

  function stop(reason, detail) {
    s.stopped = true;
    clearTimeout(s.timer);
    s.timer = null;
    setStatus("disconnected", reason);
    fire("error", { reason, detail: detail || null });
  }

  function scheduleReconnect() {
    if (s.stopped) return;
    const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * Math.pow(2, s.attempt));
    const delay = cap / 2 + Math.random() * (cap / 2); // "equal jitter": never hammering, never stuck
    s.attempt += 1;
    s.retryAt = Date.now() + delay;
    setStatus("connecting", "retry in " + Math.ceil(delay / 1000) + " s");
    clearTimeout(s.timer);
    s.timer = setTimeout(open, delay);
  }

  function send(frame) {
    if (!s.ws || s.ws.readyState !== 1) return false;
    s.ws.send(JSON.stringify(frame));
    return true;
  }

  function subFrame(type, sub) {
    const frame = { type, topic: sub.topic };
    if (sub.host) frame.host = sub.host;
    if (sub.command_id) frame.command_id = sub.command_id;
    if (sub.replay) frame.after = sub.after; // after a reconnect: only what followed the last seq seen
    return frame;
  }

  function onFrame(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch (_) {
      return;
    }
    if (!frame || typeof frame !== "object") return;
    if (frame.type === "event") {
      fire(frame.topic, frame.data, frame.host);
      return;
    }
    if (frame.id !== undefined && frame.id !== null && s.pending.has(frame.id)) {
      const entry = s.pending.get(frame.id);
      s.pending.delete(frame.id);
      clearTimeout(entry.timer);
      entry.ack(frame);
    }
    if (frame.type === "error") fire("error", { reason: frame.code, detail: frame.detail, id: frame.id });
  }

  async function open() {
    if (s.stopped) return;
    const generation = ++s.generation;
    setStatus("connecting");
    let ticket;
    try {
      ticket = await fetchTicket();
    } catch (err) {
      if (generation !== s.generation) return;
      if (err && err.unauthorized) {
        stop("unauthorized", err.message);
        return;
      }
      fire("error", { reason: "ticket", detail: String(err && err.message ? err.message : err) });
      scheduleReconnect();
      return;
    }
    if (generation !== s.generation || s.stopped) return;
    let ws;
    try {
      ws = new global.WebSocket(socketUrl(ticket));
    } catch (err) {
      fire("error", { reason: "socket", detail: String(err) });
      scheduleReconnect();
      return;
    }
    s.ws = ws;
    ws.onopen = () => {
      if (generation !== s.generation) return;
      s.attempt = 0;
      setStatus("connected");
      for (const sub of s.subs.values()) send(subFrame("subscribe", sub)); // again, after a reconnect
    };
    ws.onmessage = (ev) => {
      if (generation === s.generation && typeof ev.data === "string") onFrame(ev.data);
    };
    ws.onclose = (ev) => {
      if (generation !== s.generation) return;
      s.ws = null;
      failPending("disconnected", "the connection closed (" + ev.code + ")");
      if (ev.code === 4403) {
        stop("revoked", ev.reason || "the API key was revoked");
      } else if (!s.stopped) {
        if (ev.code !== 4401 && ev.code !== 1000 && ev.code !== 1001 && ev.code !== 1006) {
          fire("error", { reason: "closed", code: ev.code, detail: ev.reason || null });
        }
        scheduleReconnect();
      }
    };
  }

  const WarlockSocket = {
    /** Connect (again) with { apiKey } or { getTicket }, and { base } when the API is not at "/". */
    connect(options) {
      if (!options || (!options.apiKey && typeof options.getTicket !== "function")) {
        throw new Error("WarlockSocket.connect needs { apiKey } or { getTicket }");
      }
      this.disconnect(true);
      s.options = Object.assign({}, options);
      s.stopped = false;
      s.attempt = 0;
      open();
    },

    /** Close and stop reconnecting; subscriptions are forgotten unless `keepSubscriptions`. */
    disconnect(keepSubscriptions) {
      s.generation += 1;
      s.stopped = true;
      clearTimeout(s.timer);
      s.timer = null;
      if (s.ws) {
        try {
          s.ws.close(1000, "");
        } catch (_) {
          /* already closed */
        }
        s.ws = null;
      }
      failPending("disconnected", "disconnected by the page");
      if (!keepSubscriptions) s.subs.clear();
      setStatus("disconnected");
    },

    isConnected() {
      return !!s.ws && s.ws.readyState === 1 && s.status === "connected";
    },

    status() {
      return s.status;
    },

    /** cb(data, host) for presence/metrics/output/commands; cb(state, detail) for status; cb(err) for error. */
    on(event, cb) {
      if (!s.handlers.has(event)) s.handlers.set(event, new Set());
      const set = s.handlers.get(event);
      const entry = (...args) => cb(...args); // a distinct entry: the same cb may be registered twice
      set.add(entry);
      return () => set.delete(entry);
    },

    /** Send {type: event, ...data, id}; ack(reply) gets the reply frame with that id (ack, error or pong). */
    emit(event, data, ack) {
      const id = s.nextId++;
      const frame = Object.assign({}, data || {}, { type: event, id });
      if (typeof ack === "function") {
        const timer = setTimeout(() => {
          if (s.pending.delete(id)) ack({ type: "error", id, code: "timeout", detail: "no reply" });
        }, ACK_TIMEOUT_MS);
        s.pending.set(id, { ack, timer });
      }
      if (!send(frame)) {
        const entry = s.pending.get(id);
        if (entry) {
          s.pending.delete(id);
          clearTimeout(entry.timer);
          setTimeout(() => entry.ack({ type: "error", id, code: "disconnected", detail: "not connected" }), 0);
        }
        return false;
      }
      return true;
    },

    /** Subscribe to a topic ({host} or all hosts; output needs {command_id}); kept across reconnects.
     *  Output with {after: seq} (0: from the start) replays the stored chunks after it, then live ones,
     *  then one {command_id, end: true, outcome} event; after a reconnect it resumes from the last seq.
     *  Output chunks reach each callback once, in order of arrival. Returns the unsubscribe function.
     *  ack(reply), when given, gets the server's answer. */
    subscribe(topic, filter, cb, ack) {
      if (!EVENT_TOPICS.includes(topic)) throw new Error("unknown topic " + topic);
      const f = filter || {};
      const replay = topic === "output" && Number.isInteger(f.after) && f.after >= 0;
      const sub = {
        topic,
        host: f.host || null,
        command_id: f.command_id || null,
        count: 0,
        replay,
        after: replay ? f.after : null,
      };
      const key = [topic, sub.host || "", sub.command_id || "", replay ? "replay" : ""].join("|");
      const known = s.subs.get(key);
      const entry = known || sub;
      entry.count += 1;
      if (!known) {
        s.subs.set(key, entry);
        if (s.status === "connected") this.emit("subscribe", subFrame("subscribe", entry), ack);
        else if (ack) setTimeout(() => ack({ type: "pending", detail: "sent when connected" }), 0);
      } else if (ack) {
        setTimeout(() => ack({ type: "ack", id: null }), 0);
      }
      const seen = new Set(); // output seqs this callback got (a replay and a live subscription may overlap)
      let ended = false;
      const off = this.on(topic, (data, host) => {
        if (entry.host && host !== entry.host) return;
        if (entry.command_id && (!data || data.command_id !== entry.command_id)) return;
        if (topic === "output" && data) {
          if (data.end) {
            if (!entry.replay || ended) return; // the end belongs to replaying subscriptions, once
            ended = true;
          } else if (typeof data.seq === "number") {
            if (seen.has(data.seq) || (replay && data.seq <= (f.after || 0))) return;
            seen.add(data.seq);
            if (entry.replay && data.seq > entry.after) entry.after = data.seq;
          }
        }
        cb(data, host);
      });
      let done = false;
      return () => {
        if (done) return;
        done = true;
        off();
        entry.count -= 1;
        if (entry.count <= 0 && s.subs.get(key) === entry) {
          s.subs.delete(key);
          if (s.status === "connected") this.emit("unsubscribe", subFrame("unsubscribe", entry));
        }
      };
    },

    /** Metrics samples of one host (or of all hosts when `host` is null). */
    subscribeMetrics(host, cb) {
      return this.subscribe("metrics", { host }, cb);
    },
  };

  global.WarlockSocket = WarlockSocket;
})(typeof window !== "undefined" ? window : globalThis);
