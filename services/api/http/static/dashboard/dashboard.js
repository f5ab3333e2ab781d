/* The Warlock dashboard: login, the live host list, a host's charts, the command box.
 *
 * The API key is kept in sessionStorage (this tab only, gone when it closes, never sent by the browser on
 * its own as a cookie would be) and sent only in the Authorization header. The host list comes from
 * GET /api/fleet once, then stays live over the browser stream (presence and metrics of all hosts); it
 * renders only the visible rows (fixed row height) and applies updates once per animation frame.
 */
(function () {
  "use strict";

  const KEY_STORE = "warlock.apiKey";
  const ROW_H = 28;
  const OVERSCAN = 8;
  const HISTORY_S = 3600;
  const MIN_SPAN_S = 300;
  const $ = (id) => document.getElementById(id);

  const model = {
    rows: new Map(), // id -> row (GET /api/fleet shape)
    order: [], // ids, sorted
    visible: [], // ids passing the filter
    filter: "",
    selected: null,
    events: 0, // presence and metrics events applied (data-events on #hosts, for tests and curious eyes)
  };
  let dirty = false; // the visible slice needs repainting
  let refilter = false; // the filter result needs recomputing
  let frame = 0;
  let pool = [];
  let unsubscribers = [];
  let refetchTimer = null;
  const charts = { cpu: null, mem: null, disk: null };
  let detailOff = null;
  let commandOff = [];

  // ----------------------------------------------------------------------------- the key and the API

  function apiKey() {
    return sessionStorage.getItem(KEY_STORE);
  }

  async function api(method, path, body) {
    const headers = { Authorization: "Bearer " + apiKey() };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const answer = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
    });
    let json = null;
    try {
      json = await answer.json();
    } catch (_) {
      json = null;
    }
    return { status: answer.status, ok: answer.ok, json };
  }

  function describe(answer) {
    const detail = answer.json && answer.json.detail !== undefined ? answer.json.detail : answer.json;
    const text = typeof detail === "string" ? detail : JSON.stringify(detail);
    return "HTTP " + answer.status + ": " + text;
  }

  // ----------------------------------------------------------------------------- login / logout

  function showLogin(message) {
    $("app").hidden = true;
    $("filter").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    const err = $("login-error");
    err.hidden = !message;
    err.textContent = message || "";
    $("api-key").focus();
  }

  async function login(event) {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    const ok = await start();
    if (ok) $("api-key").value = "";
  }

  function logout() {
    sessionStorage.removeItem(KEY_STORE);
    WarlockSocket.disconnect();
    for (const off of unsubscribers) off();
    unsubscribers = [];
    closeDetail();
    model.rows.clear();
    model.order = [];
    model.visible = [];
    scheduleRender(true);
    showLogin("");
  }

  async function start() {
    const answer = await loadFleet();
    if (answer.status === 401 || answer.status === 403) {
      sessionStorage.removeItem(KEY_STORE);
      showLogin("Login failed: " + describe(answer));
      return false;
    }
    if (!answer.ok) {
      showLogin("Could not load the fleet: " + describe(answer));
      return false;
    }
    $("login").hidden = true;
    $("app").hidden = false;
    $("filter").hidden = false;
    $("logout").hidden = false;
    for (const off of unsubscribers) off();
    unsubscribers = [
      WarlockSocket.subscribe("presence", {}, onPresence),
      WarlockSocket.subscribe("metrics", {}, onMetrics),
      WarlockSocket.on("status", (state) => {
        if (state === "connected") scheduleRefetch(0); // what changed while we were away
      }),
      WarlockSocket.on("error", (err) => {
        if (err && (err.reason === "unauthorized" || err.reason === "revoked")) {
          sessionStorage.removeItem(KEY_STORE);
          showLogin("Logged out: " + (err.detail || err.reason));
        }
      }),
    ];
    WarlockSocket.connect({ apiKey });
    return true;
  }

  // ----------------------------------------------------------------------------- the model

  async function loadFleet() {
    const answer = await api("GET", "/api/fleet");
    if (answer.ok && Array.isArray(answer.json)) {
      const seen = new Set();
      for (const row of answer.json) {
        seen.add(row.id);
        model.rows.set(row.id, row);
      }
      for (const id of Array.from(model.rows.keys())) if (!seen.has(id)) model.rows.delete(id);
      model.order = Array.from(model.rows.keys()).sort();
      scheduleRender(true);
      if (model.selected && model.rows.has(model.selected)) paintDetailHead();
    }
    return answer;
  }

  function scheduleRefetch(delay) {
    if (refetchTimer !== null) return;
    refetchTimer = setTimeout(async () => {
      refetchTimer = null;
      if (apiKey()) await loadFleet();
    }, delay);
  }

  function onPresence(data, host) {
    model.events += 1;
    const row = model.rows.get(host);
    if (!row) {
      scheduleRefetch(1000); // a host we do not list yet
      return;
    }
    if (data.state === "connected") {
      row.presence = "agent";
      row.agent_version = data.agent_version || row.agent_version;
      row.gateway_id = data.gateway_id || null;
      row.connected_at = data.at ? new Date(data.at * 1000).toISOString() : row.connected_at;
    } else {
      row.presence = row.ssh_fallback ? "ssh" : "offline";
      row.gateway_id = null;
      row.connected_at = null;
    }
    scheduleRender(false);
    if (host === model.selected) paintDetailHead();
  }

  function diskOf(sample) {
    let most = null;
    for (const d of sample.disks || []) if (most === null || d.percent > most) most = d.percent;
    return most;
  }

  function onMetrics(sample, host) {
    model.events += 1;
    const row = model.rows.get(host);
    if (!row) {
      scheduleRefetch(1000);
      return;
    }
    row.cpu = sample.cpu_percent;
    row.mem = sample.memory_percent;
    row.disk = diskOf(sample);
    if (typeof sample.rtt_ms === "number") row.rtt_ms = sample.rtt_ms;
    row.sampled_at = new Date(sample.timestamp * 1000).toISOString();
    row.last_ping = row.sampled_at;
    scheduleRender(false);
  }

  function matches(row, needle) {
    if (!needle) return true;
    if (row.id.includes(needle) || row.address.toLowerCase().includes(needle)) return true;
    for (const [k, v] of Object.entries(row.labels || {})) {
      if ((k + "=" + v).toLowerCase().includes(needle)) return true;
    }
    return false;
  }

  // ----------------------------------------------------------------------------- rendering (virtual list)

  function scheduleRender(filterChanged) {
    if (filterChanged) refilter = true;
    dirty = true;
    if (!frame) frame = requestAnimationFrame(render);
  }

  function pct(v) {
    return typeof v === "number" ? v.toFixed(0) + "%" : "–";
  }

  function labelsText(labels) {
    return Object.entries(labels || {})
      .map(([k, v]) => k + "=" + v)
      .join(" ");
  }

  function rowElement(i) {
    while (pool.length <= i) {
      const el = document.createElement("div");
      el.className = "row host";
      for (const c of ["c-id", "c-presence", "c-version", "c-rtt", "c-cpu", "c-mem", "c-disk", "c-labels"]) {
        const span = document.createElement("span");
        span.className = c;
        el.appendChild(span);
      }
      const badge = document.createElement("span");
      badge.className = "badge";
      el.children[1].appendChild(badge);
      $("hosts").appendChild(el);
      pool.push(el);
    }
    return pool[i];
  }

  function render() {
    frame = 0;
    if (!dirty) return;
    dirty = false;
    const list = $("hosts");
    if (refilter) {
      refilter = false;
      const needle = model.filter;
      model.visible = needle ? model.order.filter((id) => matches(model.rows.get(id), needle)) : model.order;
      $("hosts-spacer").style.height = model.visible.length * ROW_H + "px";
      list.dataset.count = String(model.visible.length);
      list.dataset.total = String(model.order.length);
    }
    const first = Math.max(0, Math.floor(list.scrollTop / ROW_H) - OVERSCAN);
    const shown = Math.ceil((list.clientHeight || 600) / ROW_H) + 2 * OVERSCAN;
    const last = Math.min(model.visible.length, first + shown);
    let n = 0;
    for (let i = first; i < last; i++, n++) {
      const row = model.rows.get(model.visible[i]);
      const el = rowElement(n);
      el.hidden = false;
      el.style.top = i * ROW_H + "px";
      el.dataset.host = row.id;
      el.dataset.presence = row.presence;
      el.classList.toggle("selected", row.id === model.selected);
      const c = el.children;
      c[0].textContent = row.id;
      c[0].title = row.address;
      const badge = c[1].firstChild;
      badge.className = "badge " + row.presence;
      badge.textContent = row.presence === "agent" ? "agent" : row.presence === "ssh" ? "SSH only" : "offline";
      c[2].textContent = row.agent_version || "–";
      c[3].textContent = typeof row.rtt_ms === "number" ? row.rtt_ms.toFixed(1) + " ms" : "–";
      c[4].textContent = pct(row.cpu);
      c[5].textContent = pct(row.mem);
      c[6].textContent = pct(row.disk);
      c[7].textContent = labelsText(row.labels);
    }
    for (let i = n; i < pool.length; i++) pool[i].hidden = true;
    const counts = { agent: 0, ssh: 0, offline: 0 };
    for (const row of model.rows.values()) counts[row.presence] = (counts[row.presence] || 0) + 1;
    $("fleet-summary").textContent =
      model.order.length + (model.order.length === 1 ? " host · " : " hosts · ") + counts.agent + " agent · " + counts.ssh + " SSH only · " + counts.offline + " offline";
    list.dataset.events = String(model.events);
  }

  // ----------------------------------------------------------------------------- the host view and charts

  function paintDetailHead() {
    const row = model.rows.get(model.selected);
    if (!row) return;
    $("detail-host").textContent = row.id;
    const badge = $("detail-presence");
    badge.className = "badge " + row.presence;
    badge.dataset.presence = row.presence;
    badge.textContent = row.presence === "agent" ? "agent connected" : row.presence === "ssh" ? "SSH only" : "offline";
    const parts = [row.address];
    if (row.agent_version) parts.push("agent " + row.agent_version);
    if (row.gateway_id) parts.push("gateway " + row.gateway_id);
    const labels = labelsText(row.labels);
    if (labels) parts.push(labels);
    $("detail-info").textContent = parts.join(" · ");
  }

  function makeChart(canvas) {
    return { canvas, points: [] }; // points: [unix seconds, percent]
  }

  function drawChart(chart) {
    const canvas = chart.canvas;
    const ctx = canvas.getContext("2d");
    const w = canvas.width;
    const h = canvas.height;
    ctx.clearRect(0, 0, w, h);
    ctx.strokeStyle = "#e3e6eb";
    ctx.lineWidth = 1;
    for (const p of [0.25, 0.5, 0.75]) {
      ctx.beginPath();
      ctx.moveTo(0, Math.round(h * p) + 0.5);
      ctx.lineTo(w, Math.round(h * p) + 0.5);
      ctx.stroke();
    }
    const now = Date.now() / 1000;
    chart.points = chart.points.filter((p) => p[0] >= now - HISTORY_S);
    canvas.dataset.points = String(chart.points.length);
    if (!chart.points.length) return;
    // the last hour at most, at least 5 minutes: a young host's few points are not squeezed to one edge
    const from = Math.max(now - HISTORY_S, Math.min(chart.points[0][0], now - MIN_SPAN_S));
    const span = Math.max(1, now - from);
    const x = (t) => ((t - from) / span) * (w - 4) + 2;
    const y = (v) => h - 2 - (Math.max(0, Math.min(100, v)) / 100) * (h - 4);
    ctx.strokeStyle = "#1a73e8";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    chart.points.forEach((p, i) => (i ? ctx.lineTo(x(p[0]), y(p[1])) : ctx.moveTo(x(p[0]), y(p[1]))));
    ctx.stroke();
    const lastPoint = chart.points[chart.points.length - 1];
    ctx.fillStyle = "#1a73e8";
    ctx.beginPath();
    ctx.arc(x(lastPoint[0]), y(lastPoint[1]), 2.5, 0, 2 * Math.PI);
    ctx.fill();
  }

  function addPoint(name, at, value) {
    if (typeof value !== "number") return;
    const chart = charts[name];
    const pts = chart.points;
    if (pts.length && pts[pts.length - 1][0] >= at) return; // history and live overlap
    pts.push([at, value]);
    $("detail-" + name).textContent = value.toFixed(1) + "%";
    drawChart(chart);
  }

  async function openDetail(host) {
    closeDetail();
    model.selected = host;
    $("detail").hidden = false;
    $("cmd-target").value = host;
    paintDetailHead();
    for (const name of Object.keys(charts)) {
      charts[name] = makeChart($("chart-" + name));
      $("detail-" + name).textContent = "–";
      drawChart(charts[name]);
    }
    const live = [];
    detailOff = WarlockSocket.subscribeMetrics(host, (sample) => live.push(sample));
    const answer = await api("GET", "/api/hosts/" + encodeURIComponent(host) + "/metrics")  // the last hour;
    if (model.selected !== host) return;
    if (answer.ok) {
      for (const p of answer.json.points) {
        const at = Date.parse(p.at) / 1000;
        addPoint("cpu", at, p.cpu);
        addPoint("mem", at, p.mem);
        addPoint("disk", at, p.disk);
      }
    }
    const onSample = (sample) => {
      addPoint("cpu", sample.timestamp, sample.cpu_percent);
      addPoint("mem", sample.timestamp, sample.memory_percent);
      addPoint("disk", sample.timestamp, diskOf(sample));
    };
    live.forEach(onSample);
    detailOff();
    detailOff = WarlockSocket.subscribeMetrics(host, onSample);
    scheduleRender(false);
  }

  function closeDetail() {
    if (detailOff) detailOff();
    detailOff = null;
    model.selected = null;
    $("detail").hidden = true;
    scheduleRender(false);
  }

  // ----------------------------------------------------------------------------- the command box

  function parseLabels(text) {
    const labels = {};
    for (const part of text.split(",")) {
      const [k, ...rest] = part.trim().split("=");
      if (!k || !rest.length) return null;
      labels[k.trim()] = rest.join("=").trim();
    }
    return labels;
  }

  function cmdError(message) {
    const el = $("cmd-error");
    el.hidden = !message;
    el.textContent = message || "";
  }

  function setCmdStatus(state, text, extra) {
    const el = $("cmd-status");
    el.dataset.state = state;
    for (const k of ["exit", "via", "status"]) delete el.dataset[k];
    Object.assign(el.dataset, extra || {});
    el.textContent = text;
  }

  function finishedText(run) {
    const parts = ["status " + run.status];
    if (run.exit_code !== null && run.exit_code !== undefined) parts.unshift("exit " + run.exit_code);
    if (run.via) parts.push("via " + run.via);
    if (typeof run.duration_ms === "number") parts.push(run.duration_ms.toFixed(0) + " ms");
    if (run.error_description) parts.push(run.error_description);
    return parts.join(" · ");
  }

  async function runCommand(event) {
    event.preventDefault();
    for (const off of commandOff) off();
    commandOff = [];
    cmdError("");
    const target = $("cmd-target").value.trim();
    const command = $("cmd-input").value;
    $("cmd-result").hidden = false;
    $("cmd-output").textContent = "";
    $("cmd-output").hidden = target.includes("="); // a job lists outcomes, not one host's output
    $("job-outcomes").hidden = true;
    $("job-outcomes").querySelector("tbody").textContent = "";
    if (target.includes("=")) return runJob(target, command);
    return runOne(target, command);
  }

  async function runOne(host, command) {
    setCmdStatus("sending", "sending…");
    let done = false;
    const output = $("cmd-output");
    const finish = (run) => {
      if (done) return;
      done = true;
      setCmdStatus(run.status, finishedText(run), {
        status: run.status,
        via: run.via || "",
        exit: run.exit_code === null || run.exit_code === undefined ? "" : String(run.exit_code),
      });
    };
    const answer = await api("POST", "/api/hosts/" + encodeURIComponent(host) + "/exec?async=true", { command });
    if (answer.status !== 202) {
      setCmdStatus("error", "");
      cmdError("Refused: " + describe(answer));
      return;
    }
    const commandId = answer.json.command_id;
    output.dataset.commandId = commandId;
    setCmdStatus("running", "running " + commandId + "…");
    // after: 0 replays from the first chunk (those sent before this subscription too), then live ones, in
    // order, then the recorded outcome; a reconnect resumes after the last chunk seen
    commandOff.push(
      WarlockSocket.subscribe("output", { host, command_id: commandId, after: 0 }, (data) => {
        if (done) return;
        if (data.end) {
          if (data.outcome.truncated) output.textContent += "\n[truncated]";
          finish(data.outcome);
          return;
        }
        output.textContent += data.data;
        output.scrollTop = output.scrollHeight;
      })
    );
    // without the socket for a while, the API says when the run is settled
    for (let wait = 2000; !done; wait = Math.min(wait * 2, 8000)) {
      await new Promise((r) => setTimeout(r, wait));
      if (done || WarlockSocket.isConnected()) continue;
      const run = await api("GET", "/api/commands/" + encodeURIComponent(commandId));
      if (done) return;
      if (run.ok && !["pending", "queued", "running"].includes(run.json.status)) {
        output.textContent = run.json.stdout + (run.json.stderr ? run.json.stderr : ""); // the stored record
        if (run.json.truncated) output.textContent += "\n[truncated]";
        finish(run.json);
        return;
      }
      if (!run.ok && run.status !== 503) {
        cmdError("Could not read the command: " + describe(run));
        return;
      }
    }
  }

  async function runJob(selector, command) {
    const labels = parseLabels(selector);
    if (!labels) {
      cmdError("Target: a host id, or labels as k=v[,k2=v2]");
      return;
    }
    setCmdStatus("sending", "sending…");
    const body = $("job-outcomes").querySelector("tbody");
    const rows = new Map();
    const show = (host, run) => {
      let tr = rows.get(host);
      if (!tr) {
        tr = document.createElement("tr");
        for (let i = 0; i < 4; i++) tr.appendChild(document.createElement("td"));
        rows.set(host, tr);
        body.appendChild(tr);
      }
      tr.dataset.host = host;
      tr.dataset.status = run.status;
      const cells = tr.children;
      cells[0].textContent = host;
      cells[1].textContent = run.status;
      cells[2].textContent = run.exit_code === null || run.exit_code === undefined ? "–" : String(run.exit_code);
      cells[3].textContent = run.via || "–";
    };
    let ids = null;
    const early = [];
    const onEvent = (data, host) => {
      if (data.event !== "finished") return;
      if (ids === null) early.push([data, host]);
      else if (ids.has(data.command_id)) show(host, data);
    };
    commandOff.push(WarlockSocket.subscribe("commands", {}, onEvent));
    const answer = await api("POST", "/api/jobs", { command, targets: { labels } });
    if (answer.status !== 202) {
      setCmdStatus("error", "");
      cmdError("Refused: " + describe(answer));
      return;
    }
    const jobId = answer.json.job_id;
    $("job-outcomes").hidden = false;
    for (let wait = 300; ; wait = Math.min(wait * 2, 3000)) {
      const job = await api("GET", "/api/jobs/" + encodeURIComponent(jobId));
      if (!job.ok) {
        cmdError("Could not read the job: " + describe(job));
        return;
      }
      if (ids === null) {
        ids = new Set((job.json.outcomes || []).map((o) => o.command_id));
        for (const [data, host] of early.splice(0)) if (ids.has(data.command_id)) show(host, data);
      }
      const c = job.json.counts;
      const summary = "job " + jobId + " · " + job.json.state + " · " + c.succeeded + " succeeded, " + c.failed + " failed, " + c.timed_out + " timed out, " + c.unreachable + " unreachable, " + c.pending + " pending";
      if (job.json.finished_at) {
        for (const o of job.json.outcomes || []) show(o.host_id, o);
        setCmdStatus(job.json.state, summary, { status: job.json.state });
        return;
      }
      setCmdStatus("running", summary);
      await new Promise((r) => setTimeout(r, wait));
    }
  }

  // ----------------------------------------------------------------------------- wiring

  function init() {
    $("login-form").addEventListener("submit", login);
    $("logout").addEventListener("click", logout);
    $("cmd-form").addEventListener("submit", runCommand);
    $("detail-close").addEventListener("click", closeDetail);
    $("filter").addEventListener("input", (e) => {
      model.filter = e.target.value.trim().toLowerCase();
      scheduleRender(true);
    });
    $("hosts").addEventListener("scroll", () => scheduleRender(false), { passive: true });
    $("hosts").addEventListener("click", (e) => {
      const el = e.target.closest(".row.host");
      if (el && el.dataset.host) openDetail(el.dataset.host);
    });
    window.addEventListener("resize", () => scheduleRender(false));
    if (apiKey()) start();
    else showLogin("");
  }

  init();
})();
