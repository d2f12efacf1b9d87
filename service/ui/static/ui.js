/* foveate live page: reads /ui/events (Server-Sent Events over fetch, so that an API key header can be
   sent), draws its charts as SVG, and calls the public API for stream details and controls.
   No library, no build step, nothing loaded from the internet. */
(function () {
  "use strict";

  const KEY_STORE = "foveate.apiKey";
  const HISTORY = 240;            // points kept for the time-series charts (2 min at 2 snapshots/s)
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  const state = {
    selected: null,               // the followed stream id
    detailFor: null,              // {id, fixations} of the detail last fetched
    detailBusy: false,
    history: { t: [], dim: [], tps: [], queue: [] },
    snapshots: 0,
  };

  // ------------------------------------------------------------------ API calls

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const key = sessionStorage.getItem(KEY_STORE);
    if (key) h["X-API-Key"] = key;
    return h;
  }

  async function api(method, path) {
    // a POST carries a JSON body: the server refuses bodiless or non-JSON state changes (browser rules)
    const init = { method, headers: headers({ Accept: "application/json" }) };
    if (method === "POST") {
      init.headers["Content-Type"] = "application/json";
      init.body = "{}";
    }
    const res = await fetch(path, init);
    let body = null;
    try { body = await res.json(); } catch (e) { body = null; }
    if (!res.ok) {
      const why = body && (body.detail || body.error) ? (body.detail || body.error) : res.statusText;
      throw new Error(`${method} ${path}: ${res.status} ${typeof why === "string" ? why : JSON.stringify(why)}`);
    }
    return body;
  }

  function toast(text, isError) {
    const el = document.createElement("div");
    el.className = "toast" + (isError ? " err" : "");
    el.textContent = text;
    $("toasts").appendChild(el);
    setTimeout(() => el.remove(), isError ? 8000 : 4000);
  }

  // ------------------------------------------------------------------ formatting

  const fmt = (v, d = 3) => (v === null || v === undefined || !isFinite(v)) ? "–" : Number(v).toFixed(d);
  function compact(n) {
    if (n === null || n === undefined) return "–";
    if (n >= 1e6) return (n / 1e6).toFixed(2) + " M";
    if (n >= 1e4) return (n / 1e3).toFixed(1) + " k";
    return String(n);
  }
  function duration(s) {
    if (s === null || s === undefined) return "–";
    s = Math.max(0, Math.floor(s));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return h ? `${h} h ${m} min` : m ? `${m} min ${sec} s` : `${sec} s`;
  }
  function ago(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 1.5) return "just now";
    return duration(seconds) + " ago";
  }
  function skillClass(v) { return (v === null || v === undefined) ? "" : (v >= 0 ? "pos" : "neg"); }
  function setText(id, text) { const el = $(id); if (el.textContent !== text) el.textContent = text; }

  // ------------------------------------------------------------------ SVG charts

  function el(name, attrs, parent) {
    const node = document.createElementNS(SVG, name);
    for (const k in attrs) node.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(node);
    return node;
  }

  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) { hi = lo + 1; }
    const raw = (hi - lo) / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const ticks = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) ticks.push(+v.toFixed(10));
    return ticks;
  }

  /* series: [{cls, points: [[x, y], ...]}]; opts: {xLabel, yMin, yMax, xTicks: [[x, label]], dots, area} */
  function lineChart(svg, series, opts) {
    const vb = svg.viewBox.baseVal, W = vb.width, H = vb.height;
    const m = { l: 40, r: 10, t: 8, b: opts.xLabel ? 32 : 20 };
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const pts = series.flatMap((s) => s.points).filter((p) => p[1] !== null && isFinite(p[1]));
    svg.setAttribute("data-n", String(series.length ? series[0].points.filter((p) => p[1] !== null).length : 0));
    if (!pts.length) {
      el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "nodata" }, svg).textContent = opts.empty || "no data yet";
      return;
    }
    let x0 = Math.min(...pts.map((p) => p[0])), x1 = Math.max(...pts.map((p) => p[0]));
    if (x1 === x0) { x1 = x0 + 1; }
    let y0 = opts.yMin !== undefined ? opts.yMin : Math.min(...pts.map((p) => p[1]));
    let y1 = opts.yMax !== undefined ? opts.yMax : Math.max(...pts.map((p) => p[1]));
    if (y1 <= y0) { y1 = y0 + (Math.abs(y0) || 1) * 0.5; y0 = opts.yMin !== undefined ? y0 : y0 - (Math.abs(y0) || 1) * 0.5; }
    const yt = niceTicks(y0, y1 * 1.04, 4);
    y1 = Math.max(y1, yt[yt.length - 1]);
    const X = (x) => m.l + (x - x0) / (x1 - x0) * (W - m.l - m.r);
    const Y = (y) => H - m.b - (y - y0) / (y1 - y0) * (H - m.t - m.b);
    for (const v of yt) {
      el("line", { x1: m.l, x2: W - m.r, y1: Y(v), y2: Y(v), class: "grid-line" }, svg);
      el("text", { x: m.l - 6, y: Y(v) + 3.5, "text-anchor": "end", class: "axis" }, svg).textContent =
        Math.abs(v) >= 100 ? v.toFixed(0) : +v.toFixed(3);
    }
    const xt = opts.xTicks || niceTicks(x0, x1, 5).filter((v) => v >= x0 && v <= x1).map((v) => [v, String(v)]);
    for (const [v, label] of xt) {
      const anchor = opts.xTicks && v >= x1 ? "end" : opts.xTicks && v <= x0 ? "start" : "middle";
      el("text", { x: X(v), y: H - m.b + 14, "text-anchor": anchor, class: "axis" }, svg).textContent = label;
    }
    if (opts.xLabel) {
      el("text", { x: (m.l + W - m.r) / 2, y: H - 4, "text-anchor": "middle", class: "axis" }, svg).textContent = opts.xLabel;
    }
    for (const s of series) {
      // a null y breaks the line (an unscored fixation after a reset)
      let d = "", pen = false;
      for (const [x, y] of s.points) {
        if (y === null || !isFinite(y)) { pen = false; continue; }
        d += (pen ? "L" : "M") + X(x).toFixed(1) + " " + Y(y).toFixed(1);
        pen = true;
      }
      if (opts.area && s.points.length) {
        const good = s.points.filter((p) => p[1] !== null);
        if (good.length > 1) {
          el("path", { class: "area", d: `M${X(good[0][0])} ${Y(y0)}` + good.map((p) => `L${X(p[0]).toFixed(1)} ${Y(p[1]).toFixed(1)}`).join("") + `L${X(good[good.length - 1][0])} ${Y(y0)}Z` }, svg);
        }
      }
      el("path", { class: s.cls, d }, svg);
      if (opts.dots && s.cls === "model") {
        for (const [x, y] of s.points) if (y !== null) el("circle", { cx: X(x), cy: Y(y), r: 2.6, class: "dotm" }, svg);
      }
    }
  }

  function historyChart(id, values, empty) {
    const t = state.history.t, now = t.length ? t[t.length - 1] : 0;
    const points = values.map((v, i) => [t[i] - now, v]);
    lineChart($(id), [{ cls: "line", points }], {
      yMin: 0, area: true, empty,
      xTicks: [[t.length ? t[0] - now : -1, t.length ? `${Math.round(t[0] - now)} s` : ""], [0, "now"]],
    });
  }

  // ------------------------------------------------------------------ rendering

  function renderModel(snap) {
    const m = snap.model || {};
    const cfg = m.config || {};
    setText("m-trunk", m.trunk || cfg.trunk || "–");
    setText("m-weights", m.trunk_weights ? `weights: ${m.trunk_weights}` : "weights: package default");
    const params = m.parameters || {};
    const total = params.total !== undefined ? params.total : Object.values(params).reduce((a, b) => a + (typeof b === "number" ? b : 0), 0);
    setText("m-params", compact(m.trainable_parameters !== undefined ? m.trainable_parameters : total));
    setText("m-learner", `trainable · ${m.learner || ""} · ${m.device || ""}`);
    setText("m-updates", compact(m.updates_applied));
    setText("m-ticks", `${compact(m.ticks)} ticks`);
    setText("m-uptime", duration(m.uptime_s));
    const ck = m.last_checkpoint;
    setText("m-ckpt", ck && ck.written_at ? `checkpoint ${ago(snap.t - ck.written_at)}` : (ck ? "checkpoint written" : "no checkpoint yet"));
    setText("m-streams", String(m.streams !== undefined ? m.streams : (snap.streams || []).length));
    setText("m-mode", snap.mode === "embedded" ? "embedded worker" : "worker over Redis");
    const r = snap.rates || {};
    setText("m-tps", fmt(r.ticks_per_s, 1));
    setText("m-fps", r.fixations_per_s === null || r.fixations_per_s === undefined ? "" : `${fmt(r.fixations_per_s, 1)} fixations / s`);
    setText("m-queue", snap.queue_depth === null || snap.queue_depth === undefined ? "–" : String(Math.round(snap.queue_depth)));
    const all = (snap.by_step || []);
    const skills = all.filter((s) => s.skill !== null);
    const overall = snap.skill_all !== undefined ? snap.skill_all : null;
    const sk = overall !== null ? overall : (skills.length ? skills.reduce((a, s) => a + s.skill, 0) / skills.length : null);
    const skEl = $("m-skill");
    skEl.textContent = fmt(sk, 3);
    skEl.className = "v " + skillClass(sk);
  }

  function renderStreams(snap) {
    const rows = snap.streams || [];
    const tbody = document.querySelector("#streams tbody");
    $("no-streams").style.display = rows.length ? "none" : "";
    if (state.selected === null || !rows.some((r) => r.stream_id === state.selected)) {
      state.selected = rows.length ? rows[0].stream_id : null;
    }
    const seen = new Set();
    let index = 0;
    for (const r of rows) {
      seen.add(r.stream_id);
      let tr = tbody.querySelector(`tr[data-stream="${CSS.escape(r.stream_id)}"]`);
      if (!tr) {
        tr = document.createElement("tr");
        tr.dataset.stream = r.stream_id;
        tr.innerHTML = '<td class="sid"></td><td class="num step"></td><td class="num fix"></td><td class="num last"></td>' +
          '<td class="num run"></td><td class="num rep"></td><td class="num skill"></td>' +
          '<td class="ops"><button type="button" class="btn ghost small" data-op="reset">Reset</button>' +
          '<button type="button" class="btn ghost small" data-op="delete">Delete</button></td>';
        tr.querySelector(".sid").textContent = r.stream_id;
        tr.querySelector(".sid").title = r.stream_id;
        tr.addEventListener("click", (ev) => {
          const op = ev.target.closest("button");
          if (op) { ev.stopPropagation(); control(op.dataset.op, r.stream_id); return; }
          select(r.stream_id);
        });
      }
      if (tbody.children[index] !== tr) tbody.insertBefore(tr, tbody.children[index] || null);
      index++;
      tr.classList.toggle("selected", r.stream_id === state.selected);
      tr.querySelector(".step").textContent = r.step;
      tr.querySelector(".fix").textContent = r.fixations;
      tr.querySelector(".last").textContent = ago(r.updated_at ? snap.t - r.updated_at : null);
      tr.querySelector(".run").textContent = fmt(r.running_error);
      tr.querySelector(".rep").textContent = fmt(r.repeat_error);
      const sk = tr.querySelector(".skill");
      sk.textContent = fmt(r.skill);
      sk.className = "num skill " + skillClass(r.skill);
    }
    for (const tr of Array.from(tbody.children)) if (!seen.has(tr.dataset.stream)) tr.remove();
    setText("sel-name", state.selected || "");
    setText("thumbs-name", state.selected || "");
    const sel = rows.find((r) => r.stream_id === state.selected);
    if (!sel) {
      state.detailFor = null;
      lineChart($("chart-stream"), [], { empty: "no stream yet" });
      $("thumbs").innerHTML = '<p class="empty">Select a stream.</p>';
    } else if (!state.detailFor || state.detailFor.id !== sel.stream_id || state.detailFor.fixations !== sel.fixations
               || state.detailFor.step !== sel.step) {
      fetchDetail(sel);
    }
  }

  function renderByStep(snap) {
    const rows = (snap.by_step || []);
    const x = (s) => s.endsWith("+") ? parseInt(s, 10) + 1 : parseInt(s, 10);
    lineChart($("chart-step"), [
      { cls: "model", points: rows.map((r) => [x(r.step), r.error]) },
      { cls: "repeat", points: rows.map((r) => [x(r.step), r.repeat_error]) },
    ], { yMin: 0, dots: true, xLabel: "step since reset", empty: "no scored fixation yet",
         xTicks: rows.filter((r, i) => rows.length <= 8 || i % 3 === 0 || r.step.endsWith("+")).map((r) => [x(r.step), r.step]) });
  }

  function renderHistory(snap) {
    const h = state.history;
    h.t.push(snap.t);
    h.dim.push(snap.effective_dim);
    h.tps.push(snap.rates ? snap.rates.ticks_per_s : null);
    h.queue.push(snap.queue_depth);
    for (const k of Object.keys(h)) if (h[k].length > HISTORY) h[k].shift();
    historyChart("chart-dim", h.dim, "not measured yet");
    historyChart("chart-tps", h.tps, "measuring…");
    historyChart("chart-queue", h.queue, "no worker in this process");
  }

  function render(snap) {
    // a new event stream's first snapshot has no rate yet: keep showing the last one
    if (snap.rates && snap.rates.ticks_per_s === null && state.lastRates) snap.rates = state.lastRates;
    else if (snap.rates && snap.rates.ticks_per_s !== null) state.lastRates = snap.rates;
    state.snapshots++;
    document.body.dataset.snapshots = String(state.snapshots);
    renderModel(snap);
    renderStreams(snap);
    renderByStep(snap);
    renderHistory(snap);
  }

  // ------------------------------------------------------------------ one stream

  async function fetchDetail(row) {
    if (state.detailBusy) return;
    state.detailBusy = true;
    const want = { id: row.stream_id, fixations: row.fixations, step: row.step };
    try {
      const d = await api("GET", `/ui/streams/${encodeURIComponent(row.stream_id)}`);
      if (state.selected === want.id) { renderDetail(d); state.detailFor = want; }
    } catch (e) {
      state.detailFor = want;     // not again until the stream moves
      lineChart($("chart-stream"), [], { empty: "no recent fixations in this process" });
      $("thumbs").innerHTML = '<p class="empty">No thumbnails: the worker runs in another process.</p>';
    } finally {
      state.detailBusy = false;
    }
  }

  function renderDetail(d) {
    lineChart($("chart-stream"), [
      { cls: "model", points: d.series.map((p) => [p.n, p.error]) },
      { cls: "repeat", points: d.series.map((p) => [p.n, p.repeat_error]) },
    ], { yMin: 0, xLabel: "fixation", empty: "no scored fixation yet" });
    const box = $("thumbs");
    box.textContent = "";
    const errs = d.thumbs.map((t) => t.error).filter((e) => e !== null);
    const lo = Math.min(...errs), hi = Math.max(...errs);
    for (const t of d.thumbs) {
      const fig = document.createElement("figure");
      fig.className = "thumb";
      fig.style.margin = "0";
      const img = document.createElement("img");
      img.src = t.png;
      img.alt = `fixation ${t.n}`;
      if (t.error !== null && hi > lo) {
        const u = (t.error - lo) / (hi - lo);            // 0: least surprising here, 1: most
        img.style.borderColor = `hsl(${Math.round(140 - 140 * u)}, 70%, ${Math.round(45 + 5 * (1 - u))}%)`;
      }
      img.title = t.error === null ? "not scored (first fixation after a reset)" :
        `error ${fmt(t.error)} · repeat ${fmt(t.repeat_error)}`;
      const e = document.createElement("div");
      e.className = "e";
      e.textContent = t.error === null ? "–" : fmt(t.error, 2);
      const st = document.createElement("div");
      st.className = "st";
      st.textContent = `step ${t.step}`;
      fig.append(img, e, st);
      box.appendChild(fig);
    }
    box.dataset.count = String(d.thumbs.length);
  }

  function select(id) {
    state.selected = id;
    state.detailFor = null;
    for (const tr of document.querySelectorAll("#streams tbody tr")) tr.classList.toggle("selected", tr.dataset.stream === id);
    setText("sel-name", id);
    setText("thumbs-name", id);
  }

  // ------------------------------------------------------------------ controls

  function confirmDialog(title, text, action) {
    const dlg = $("confirm");
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = action;
    return new Promise((resolve) => {
      dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok"), { once: true });
      dlg.returnValue = "";
      dlg.showModal();
    });
  }

  async function control(op, id) {
    const q = encodeURIComponent(id);
    const plans = {
      reset: ["Reset stream?", `Stream "${id}" starts a new scanpath: its state is zeroed and the next fixation is step 1.`, "Reset", "POST", `/v1/streams/${q}/reset`],
      delete: ["Delete stream?", `Stream "${id}" and its state are forgotten. Fixations sent later start it afresh.`, "Delete", "DELETE", `/v1/streams/${q}`],
      checkpoint: ["Write a checkpoint?", "The model and every stream's state are saved now (this pauses learning briefly).", "Write checkpoint", "POST", "/v1/model/checkpoint"],
    };
    const [title, text, action, method, path] = plans[op];
    if (!(await confirmDialog(title, text, action))) return;
    try {
      const body = await api(method, path);
      if (op === "checkpoint") toast(`Checkpoint written${body && body.path ? ": " + body.path : ""}`);
      else toast(op === "reset" ? `Stream ${id} reset` : `Stream ${id} deleted`);
      if (op !== "checkpoint") state.detailFor = null;
    } catch (e) {
      toast(e.message, true);
    }
  }

  function keyDialog() {
    const dlg = $("key-dialog");
    $("key-input").value = sessionStorage.getItem(KEY_STORE) || "";
    dlg.addEventListener("close", () => {
      if (dlg.returnValue === "save" && $("key-input").value.trim()) sessionStorage.setItem(KEY_STORE, $("key-input").value.trim());
      else if (dlg.returnValue === "clear") sessionStorage.removeItem(KEY_STORE);
      else return;
      $("key-btn").textContent = sessionStorage.getItem(KEY_STORE) ? "API key ✓" : "API key";
      reconnect();
    }, { once: true });
    dlg.returnValue = "";
    dlg.showModal();
  }

  // ------------------------------------------------------------------ the event stream

  let controller = null;
  function setConn(on, text) {
    $("conn").className = "dot " + (on ? "on" : "off");
    setText("conn-text", text);
  }

  function reconnect() { if (controller) controller.abort(); }

  async function stream() {
    for (;;) {
      controller = new AbortController();
      let wait = 1000;
      try {
        const res = await fetch("/ui/events", { headers: headers({ Accept: "text/event-stream" }), signal: controller.signal });
        if (!res.ok) throw new Error(res.status === 401 || res.status === 403 ? "needs an API key" : `HTTP ${res.status}`);
        setConn(true, "live");
        const reader = res.body.getReader();
        const decoder = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            let event = "message", data = "";
            for (const line of block.split("\n")) {
              if (line.startsWith("event:")) event = line.slice(6).trim();
              else if (line.startsWith("data:")) data += line.slice(5).trim();
            }
            if (event === "snapshot" && data) render(JSON.parse(data));
          }
        }
        wait = 0;                 // the server ends each stream after a while: reconnect at once
      } catch (e) {
        if (e.name !== "AbortError") setConn(false, `disconnected (${e.message}); retrying`);
        else wait = 0;
      }
      await new Promise((r) => setTimeout(r, wait));
    }
  }

  $("checkpoint").addEventListener("click", () => control("checkpoint", ""));
  $("key-btn").addEventListener("click", keyDialog);
  if (sessionStorage.getItem(KEY_STORE)) $("key-btn").textContent = "API key ✓";
  stream();
})();
