// meshserve live map: plain ES2020, no libraries. All text goes in through textContent /
// createTextNode (model names, messages and reasons come from users); never innerHTML.
"use strict";
(() => {
  const SVGNS = "http://www.w3.org/2000/svg";
  const MAX_ROWS = 500;
  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------- DOM helpers
  function setAttrs(e, attrs) {
    if (!attrs) return;
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") e.textContent = String(v);
      else e.setAttribute(k, String(v));
    }
  }
  function addKids(e, kids) {
    for (const k of kids.flat(Infinity)) {
      if (k === null || k === undefined || k === false) continue;
      e.appendChild(typeof k === "object" ? k : document.createTextNode(String(k)));
    }
  }
  function h(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    setAttrs(e, attrs);
    addKids(e, kids);
    return e;
  }
  function s(tag, attrs, ...kids) {
    const e = document.createElementNS(SVGNS, tag);
    setAttrs(e, attrs);
    addKids(e, kids);
    return e;
  }
  // A string safe to use inside a class name.
  function token(x) {
    const t = String(x ?? "").toLowerCase().replace(/[^a-z0-9_-]+/g, "-");
    return t || "unknown";
  }
  function clip(str, n) {
    str = String(str ?? "");
    return str.length > n ? str.slice(0, n - 1) + "…" : str;
  }
  function pick(o, ...keys) {
    for (const k of keys) if (o && o[k] !== undefined && o[k] !== null) return o[k];
    return undefined;
  }

  // ---------------------------------------------------------------- formatting
  function fmtBytes(b) {
    if (b === null || b === undefined || !isFinite(b)) return "—";
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = Number(b);
    let i = 0;
    while (v >= 1024 && i < u.length - 1) {
      v /= 1024;
      i++;
    }
    return (v >= 100 || i === 0 ? v.toFixed(0) : v.toFixed(1)) + " " + u[i];
  }
  function fmtRate(r) {
    r = Number(r) || 0;
    if (r >= 100) return r.toFixed(0);
    if (r >= 1) return r.toFixed(1);
    if (r > 0) return r.toFixed(2);
    return "0";
  }
  function fmtMs(x) {
    if (x === null || x === undefined || !isFinite(x)) return "—";
    x = Number(x);
    return x < 10 ? x.toFixed(1) : x.toFixed(0);
  }
  function fmtPct(x, digits = 0) {
    if (x === null || x === undefined || !isFinite(x)) return "—";
    return (Number(x) * 100).toFixed(digits) + " %";
  }
  function fmtTime(ms) {
    const d = new Date(Number(ms) || 0);
    const p = (n) => String(n).padStart(2, "0");
    return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  }

  // ---------------------------------------------------------------- auth + stream
  let auth = "none";
  let es = null;
  let streamRetryMs = 1000;
  let streamTimer = null;
  let whoamiRetryMs = 1000;

  function setConn(text, cls) {
    const c = $("conn");
    c.textContent = text;
    c.className = "conn " + cls;
  }

  async function whoami() {
    const r = await fetch("/api/whoami", { credentials: "same-origin", cache: "no-store" });
    let body = null;
    try {
      body = await r.json();
    } catch (_) {
      body = null;
    }
    return { status: r.status, body };
  }

  async function boot() {
    let res;
    try {
      res = await whoami();
    } catch (_) {
      setConn("offline — retrying…", "conn-down");
      setTimeout(boot, whoamiRetryMs);
      whoamiRetryMs = Math.min(whoamiRetryMs * 2, 30000);
      return;
    }
    whoamiRetryMs = 1000;
    if (res.status === 401) {
      showLogin("");
    } else if (res.status === 200) {
      auth = (res.body && res.body.auth) || "none";
      startApp();
    } else {
      setConn(`server error ${res.status} — retrying…`, "conn-down");
      setTimeout(boot, 5000);
    }
  }

  function showLogin(msg) {
    stopStream();
    $("app").hidden = true;
    $("detail").hidden = true;
    $("logout").hidden = true;
    $("login-view").hidden = false;
    $("login-error").textContent = msg || "";
    setConn("signed out", "conn-down");
    $("token").focus();
  }

  async function doLogin(ev) {
    ev.preventDefault();
    const input = $("token");
    const tok = input.value;
    input.value = ""; // never keep the token in the DOM
    $("login-error").textContent = "";
    let r;
    try {
      r = await fetch("/api/login", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ token: tok }),
      });
    } catch (_) {
      $("login-error").textContent = "cannot reach the server";
      return;
    }
    if (r.status === 204 || r.status === 200) {
      auth = "token";
      $("login-view").hidden = true;
      startApp();
      return;
    }
    let msg = `sign-in failed (HTTP ${r.status})`;
    try {
      const b = await r.json();
      if (b && b.error) msg = String(b.error);
    } catch (_) {
      /* keep the generic message */
    }
    $("login-error").textContent = msg;
    input.focus();
  }

  async function doLogout() {
    try {
      await fetch("/api/logout", { method: "POST", credentials: "same-origin" });
    } catch (_) {
      /* the login form shows anyway */
    }
    showLogin("");
  }

  function startApp() {
    $("login-view").hidden = true;
    $("app").hidden = false;
    $("logout").hidden = auth !== "token";
    startStream();
  }

  function stopStream() {
    if (streamTimer) clearTimeout(streamTimer);
    streamTimer = null;
    if (es) es.close();
    es = null;
  }

  function startStream() {
    stopStream();
    setConn("connecting…", "conn-down");
    const src = new EventSource("/api/stream");
    es = src;
    src.onopen = () => {
      streamRetryMs = 1000;
      setConn("live", "conn-live");
    };
    src.onerror = () => {
      if (es !== src) return;
      setConn("reconnecting…", "conn-down");
      if (src.readyState === EventSource.CLOSED) {
        // The browser gave up (e.g. a 401): ask whether the session is gone.
        src.close();
        es = null;
        whoami()
          .then((res) => {
            if (res.status === 401) showLogin("session expired — sign in again");
            else scheduleStream();
          })
          .catch(() => scheduleStream());
      }
    };
    src.addEventListener("state", (m) => {
      let st;
      try {
        st = JSON.parse(m.data);
      } catch (_) {
        return;
      }
      setConn("live", "conn-live");
      onState(st);
    });
    src.addEventListener("events", (m) => {
      let evs;
      try {
        evs = JSON.parse(m.data);
      } catch (_) {
        return;
      }
      if (Array.isArray(evs)) addEvents(evs);
    });
  }

  function scheduleStream() {
    if (streamTimer) return;
    streamTimer = setTimeout(() => {
      streamTimer = null;
      startStream();
    }, streamRetryMs);
    streamRetryMs = Math.min(streamRetryMs * 2, 30000);
  }

  // ---------------------------------------------------------------- state
  let state = null;
  let pending = null;
  let frameQueued = false;

  function onState(st) {
    pending = st;
    if (frameQueued) return;
    frameQueued = true;
    const run = () => {
      frameQueued = false;
      const cur = pending;
      pending = null;
      if (!cur) return;
      state = cur;
      renderHeader(cur);
      renderMap(cur);
      renderModels(cur);
    };
    // rAF when visible (no work for a hidden tab), a timer otherwise so state stays fresh.
    if (document.hidden) setTimeout(run, 250);
    else requestAnimationFrame(run);
  }

  function renderHeader(st) {
    const rep = st.replica || {};
    $("replica").textContent = rep.id ? `${rep.id}${rep.leader ? " (leader)" : ""}` : "";
    const nodes = st.nodes || [];
    const linked = nodes.filter((n) => n.linked).length;
    let ready = 0;
    for (const n of nodes) for (const c of n.copies || []) if (c.state === "ready") ready++;
    const models = (st.models || []).length;
    $("counts").textContent =
      `${nodes.length} node${nodes.length === 1 ? "" : "s"} · ${linked} linked · ` +
      `${models} model${models === 1 ? "" : "s"} · ${ready} ready cop${ready === 1 ? "y" : "ies"}`;
  }

  // ---------------------------------------------------------------- map layout
  const CW = 272; // card width
  const GAP = 12;
  const PAD = 12;
  const ZTITLE = 26;
  const ZGAP = 18;
  const CORR = 170; // corridor between a side and the replicas
  const REPW = 190;
  const MARGIN = 16;
  const COPY_H = 34;
  const CARD_BASE = 80;

  function cardHeight(n) {
    return CARD_BASE + COPY_H * (n.copies || []).length + 4;
  }
  function zoneCols(k) {
    return k <= 2 ? 1 : k <= 6 ? 2 : 3;
  }
  function tierOf(n) {
    return n.tier === "edge" ? "edge" : "core";
  }
  function cmpStr(a, b) {
    return a < b ? -1 : a > b ? 1 : 0;
  }

  // Zone boxes of one side, positioned relative to (0, 0); each node gets x, y, col.
  function layoutSide(nodes, tier) {
    const zones = new Map();
    const sorted = nodes.slice().sort((a, b) => {
      const za = a.zone || "\uffff"; // no zone last
      const zb = b.zone || "\uffff";
      return cmpStr(za, zb) || cmpStr(String(a.id), String(b.id));
    });
    for (const n of sorted) {
      const z = n.zone || "";
      if (!zones.has(z)) zones.set(z, []);
      zones.get(z).push(n);
    }
    const boxes = [];
    const pos = new Map();
    let y = 0;
    let width = 0;
    for (const [zone, list] of zones) {
      const cols = zoneCols(list.length);
      const rows = Math.ceil(list.length / cols);
      const rowH = [];
      for (let r = 0; r < rows; r++) {
        let m = 0;
        for (let c = 0; c < cols; c++) {
          const n = list[r * cols + c];
          if (n) m = Math.max(m, cardHeight(n));
        }
        rowH.push(m);
      }
      const w = cols * CW + (cols - 1) * GAP + 2 * PAD;
      const hgt = ZTITLE + rowH.reduce((a, b) => a + b, 0) + (rows - 1) * GAP + PAD;
      const box = { zone, tier, w, h: hgt, y, cols, items: [] };
      let ry = y + ZTITLE;
      for (let r = 0; r < rows; r++) {
        for (let c = 0; c < cols; c++) {
          const n = list[r * cols + c];
          if (!n) continue;
          const p = { node: n, box, dx: PAD + c * (CW + GAP), y: ry, col: c, h: cardHeight(n) };
          box.items.push(p);
          pos.set(String(n.id), p);
        }
        ry += rowH[r] + GAP;
      }
      boxes.push(box);
      y += hgt + ZGAP;
      width = Math.max(width, w);
    }
    return { boxes, pos, width, height: Math.max(0, y - ZGAP) };
  }

  const cards = new Map(); // node id -> <g>
  const flowEls = new Map(); // node id -> {path, label}
  let layers = null;

  function ensureLayers() {
    if (layers) return layers;
    const svg = $("map");
    layers = {};
    for (const name of ["zones", "links", "flows", "replicas", "nodes", "labels"]) {
      const g = s("g", { class: "layer-" + name });
      svg.appendChild(g);
      layers[name] = g;
    }
    return layers;
  }

  function renderMap(st) {
    const L = ensureLayers();
    const svg = $("map");
    const nodes = st.nodes || [];
    const core = layoutSide(
      nodes.filter((n) => tierOf(n) === "core"),
      "core",
    );
    const edge = layoutSide(
      nodes.filter((n) => tierOf(n) === "edge"),
      "edge",
    );
    const leftW = Math.max(core.width, CW + 2 * PAD);
    const rightW = Math.max(edge.width, CW + 2 * PAD);
    const replicas = (st.replicas && st.replicas.length ? st.replicas : [st.replica || {}]).slice();
    const repH = 40 + replicas.length * 46;
    const contentH = Math.max(core.height, edge.height, repH, 120);
    const W = MARGIN + leftW + CORR + REPW + CORR + rightW + MARGIN;
    const H = MARGIN + contentH + MARGIN;
    const repX = MARGIN + leftW + CORR;
    const repY = MARGIN + Math.max(0, Math.min(contentH / 2 - repH / 2, 260));
    const leftEdge = MARGIN + leftW; // corridor side of the core column
    const rightEdge = repX + REPW + CORR; // corridor side of the edge column

    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    // Shrink a wide map to the panel, but never below 70 % (text stays readable): then it scrolls.
    const avail = Math.max(320, (svg.parentElement ? svg.parentElement.clientWidth : W) - 10);
    const scale = Math.min(1, Math.max(0.7, avail / W));
    svg.setAttribute("width", (W * scale).toFixed(0));
    svg.setAttribute("height", (H * scale).toFixed(0));

    // Absolute positions of the cards.
    const place = new Map();
    for (const b of core.boxes) b.x = leftEdge - b.w; // right-aligned to the corridor
    for (const b of edge.boxes) b.x = rightEdge; // left-aligned to the corridor
    for (const [side, lay] of [
      ["left", core],
      ["right", edge],
    ]) {
      for (const b of lay.boxes) {
        b.y += MARGIN;
        for (const p of b.items) place.set(String(p.node.id), { ...p, x: b.x + p.dx, y: p.y + MARGIN, side });
      }
    }

    // Zone boxes.
    const zoneKids = [];
    for (const b of [...core.boxes, ...edge.boxes]) {
      const label = `${b.tier} · ${b.zone ? "zone " + b.zone : "no zone"}`;
      zoneKids.push(
        s(
          "g",
          { class: `zone zone-${b.tier}`, "data-zone": b.zone, "data-tier": b.tier },
          s("rect", { x: b.x, y: b.y, width: b.w, height: b.h, rx: 10 }),
          s("text", { x: b.x + PAD, y: b.y + 18, class: "zone-label", text: label }),
        ),
      );
    }
    if (!core.boxes.length)
      zoneKids.push(s("text", { x: leftEdge - 10, y: MARGIN + 20, class: "empty-side", "text-anchor": "end", text: "no core nodes" }));
    if (!edge.boxes.length)
      zoneKids.push(s("text", { x: rightEdge + 10, y: MARGIN + 20, class: "empty-side", text: "no edge nodes" }));
    L.zones.replaceChildren(...zoneKids);

    // Links (node ↔ replicas), one path per node; flows reuse the geometry.
    const geo = new Map();
    const sideCount = { left: 0, right: 0 };
    const sideIdx = { left: 0, right: 0 };
    for (const p of place.values()) sideCount[p.side]++;
    const linkKids = [];
    const orderedIds = [...core.pos.keys(), ...edge.pos.keys()];
    for (const id of orderedIds) {
      const p = place.get(id);
      const n = p.node;
      const k = sideIdx[p.side]++;
      const frac = sideCount[p.side] > 1 ? k / (sideCount[p.side] - 1) : 0.5;
      const y1 = repY + 34 + frac * Math.max(0, repH - 48);
      const yy = p.y + 20 + p.col * 14;
      let d;
      let lx;
      if (p.side === "left") {
        const x1 = repX;
        const x2 = leftEdge;
        d = `M${x1},${y1} C${x1 - CORR / 2},${y1} ${x2 + CORR / 2},${yy} ${x2},${yy} L${p.x + CW},${yy}`;
        lx = x2 + 6;
      } else {
        const x1 = repX + REPW;
        const x2 = rightEdge;
        d = `M${x1},${y1} C${x1 + CORR / 2},${y1} ${x2 - CORR / 2},${yy} ${x2},${yy} L${p.x},${yy}`;
        lx = x2 - 6;
      }
      geo.set(id, { d, lx, ly: yy - 5, side: p.side });
      const cls = `link ${n.tunneled ? "tunnel" : "direct"}${n.linked ? "" : " lost"}`;
      linkKids.push(
        s(
          "path",
          { class: cls, d, "data-node": id },
          s("title", { text: `${id}: ${n.tunneled ? "tunnel (node dials out)" : "direct"}${n.linked ? "" : " · lost"}` }),
        ),
      );
    }
    L.links.replaceChildren(...linkKids);

    renderReplicas(L.replicas, st, replicas, repX, repY, repH);
    renderFlows(L, st, geo);
    renderCards(L.nodes, orderedIds, place);
  }

  function renderReplicas(layer, st, replicas, x, y, hgt) {
    const me = (st.replica && st.replica.id) || "";
    const kids = [
      s("rect", { class: "replicas-box", x, y, width: REPW, height: hgt, rx: 12 }),
      s("text", { class: "replicas-title", x: x + REPW / 2, y: y + 22, "text-anchor": "middle", text: "control plane" }),
    ];
    replicas.forEach((r, i) => {
      const ry = y + 34 + i * 46;
      const isMe = r.id === me;
      const leader = r.leader === true || (isMe && st.replica && st.replica.leader);
      kids.push(
        s(
          "g",
          { class: `replica${leader ? " leader" : ""}${isMe ? " me" : ""}`, "data-replica": r.id || "" },
          s("rect", { x: x + 10, y: ry, width: REPW - 20, height: 38, rx: 6 }),
          s("text", { class: "replica-name", x: x + 20, y: ry + 16, text: clip(r.id || "?", 16) + (isMe ? " (this)" : "") }),
          s("text", { class: "replica-addr", x: x + 20, y: ry + 30, text: clip(r.address || "", 26) }),
          leader ? s("text", { class: "leader-mark", x: x + REPW - 18, y: ry + 16, "text-anchor": "end", text: "★ leader" }) : null,
        ),
      );
    });
    layer.replaceChildren(...kids);
  }

  function flowWidth(rps) {
    return Math.min(14, 1.5 + 2.2 * Math.log10(1 + Math.max(0, rps)));
  }

  function renderFlows(L, st, geo) {
    const seen = new Set();
    for (const f of st.flows || []) {
      const id = String(f.node);
      const rps = Number(f.rps) || 0;
      const g = geo.get(id);
      if (!(rps > 0) || !g || seen.has(id)) continue;
      seen.add(id);
      let el = flowEls.get(id);
      if (!el) {
        // Kept across updates so the CSS dash animation runs on without restarting.
        el = {
          path: s("path", { "data-node": id }),
          label: s("text", { class: "flow-label", "data-node": id }),
        };
        flowEls.set(id, el);
        L.flows.appendChild(el.path);
        L.labels.appendChild(el.label);
      }
      const path = f.path === "tunnel" ? "tunnel" : "direct";
      el.path.setAttribute("class", `flow path-${path}`);
      el.path.setAttribute("d", g.d);
      el.path.style.strokeWidth = flowWidth(rps).toFixed(2) + "px";
      el.label.setAttribute("x", String(g.lx));
      el.label.setAttribute("y", String(g.ly));
      el.label.setAttribute("text-anchor", g.side === "left" ? "start" : "end");
      el.label.textContent = `${fmtRate(rps)} req/s`;
    }
    for (const [id, el] of flowEls) {
      if (seen.has(id)) continue;
      el.path.remove();
      el.label.remove();
      flowEls.delete(id);
    }
  }

  function renderCards(layer, ids, place) {
    const keep = new Set(ids);
    for (const [id, g] of cards) {
      if (!keep.has(id)) {
        g.remove();
        cards.delete(id);
      }
    }
    for (const id of ids) {
      const p = place.get(id);
      const n = p.node;
      let g = cards.get(id);
      if (!g) {
        g = s("g", { "data-node": id });
        cards.set(id, g);
        layer.appendChild(g);
      }
      let cls = `node tier-${tierOf(n)}`;
      if (n.tunneled) cls += " tunneled";
      if (n.embedded) cls += " embedded";
      if (!n.linked) cls += " lost";
      if (n.draining) cls += " draining";
      g.setAttribute("class", cls);
      g.setAttribute("transform", `translate(${p.x},${p.y})`);
      // Rebuild the card only when its data changed (keeps an open tooltip otherwise).
      const sig = JSON.stringify(n) + "|" + p.h;
      if (g.__sig !== sig) {
        g.__sig = sig;
        g.replaceChildren(...cardContent(n, p.h));
      }
    }
  }

  function cardContent(n, hgt) {
    const kids = [];
    const id = String(n.id);
    kids.push(s("rect", { class: "card-bg", x: 0, y: 0, width: CW, height: hgt, rx: 8 }));
    kids.push(s("title", { text: nodeTooltip(n) }));
    const flags = [];
    if (n.embedded) flags.push("embedded");
    if (!n.linked) flags.push("lost");
    if (n.draining) flags.push("draining");
    kids.push(s("text", { class: "node-id", x: 10, y: 18, text: clip(id, 26) }));
    if (flags.length)
      kids.push(s("text", { class: "node-flags", x: CW - 10, y: 18, "text-anchor": "end", text: flags.join(" · ") }));
    kids.push(
      s("text", {
        class: "node-addr",
        x: 10,
        y: 34,
        text: n.address && !n.tunneled ? clip(n.address, 40) : "tunnel (behind NAT)",
      }),
    );
    const cpu = n.cpu_percent === null || n.cpu_percent === undefined ? "—" : `${Number(n.cpu_percent).toFixed(0)} %`;
    kids.push(
      s("text", {
        class: "node-stats",
        x: 10,
        y: 51,
        text: `cpu ${cpu} · mem ${fmtBytes(n.memory_used_bytes)} / ${fmtBytes(n.memory_total_bytes)}`,
      }),
    );
    // cpu bar
    if (n.cpu_percent !== null && n.cpu_percent !== undefined) {
      const frac = Math.max(0, Math.min(1, Number(n.cpu_percent) / 100));
      kids.push(s("rect", { class: "bar-bg", x: 10, y: 56, width: 80, height: 4, rx: 2 }));
      kids.push(s("rect", { class: "bar-cpu", x: 10, y: 56, width: (80 * frac).toFixed(1), height: 4, rx: 2 }));
    }
    if (n.memory_used_bytes && n.memory_total_bytes) {
      const frac = Math.max(0, Math.min(1, n.memory_used_bytes / n.memory_total_bytes));
      kids.push(s("rect", { class: "bar-bg", x: 96, y: 56, width: 80, height: 4, rx: 2 }));
      kids.push(s("rect", { class: "bar-mem", x: 96, y: 56, width: (80 * frac).toFixed(1), height: 4, rx: 2 }));
    }
    kids.push(s("text", { class: "node-rps", x: 10, y: 74, text: `${fmtRate(n.rps)} req/s` }));
    const nc = (n.copies || []).length;
    kids.push(
      s("text", {
        class: "node-ncopies",
        x: CW - 10,
        y: 74,
        "text-anchor": "end",
        text: nc ? `${nc} cop${nc === 1 ? "y" : "ies"}` : "no copies",
      }),
    );
    (n.copies || []).forEach((c, i) => kids.push(copyRow(c, CARD_BASE + i * COPY_H)));
    return kids;
  }

  function nodeTooltip(n) {
    const lines = [String(n.id)];
    lines.push(`${tierOf(n)} · ${n.zone ? "zone " + n.zone : "no zone"}`);
    lines.push(n.tunneled ? "tunnel (behind NAT)" : n.address || "");
    if (n.embedded) lines.push("embedded: an application running its models in-process");
    if (!n.linked) lines.push("lost: no live stream to this replica");
    if (n.draining) lines.push("draining");
    const labels = Object.entries(n.labels || {}).map(([k, v]) => `${k}=${v}`);
    if (labels.length) lines.push("labels: " + labels.join(", "));
    if ((n.providers || []).length) lines.push("providers: " + n.providers.join(", "));
    return lines.join("\n");
  }

  function copyRow(c, y) {
    const st = token(c.state);
    const key = `${c.model}/${c.variant}`;
    const kids = [s("line", { class: "copy-sep", x1: 8, x2: CW - 8, y1: 0, y2: 0 })];
    const tip = [`${key}${c.version && c.version !== c.variant ? " (version " + c.version + ")" : ""}`, `state: ${c.state}`];
    if (c.provider) tip.push(`provider: ${c.provider}`);
    if (c.errors_per_s) tip.push(`errors: ${fmtRate(c.errors_per_s)}/s`);
    if (c.in_flight !== undefined && c.in_flight !== null) tip.push(`in flight: ${c.in_flight}`);
    if (c.state === "failed") tip.unshift(`failed: ${c.reason || "(no reason given)"}`);
    kids.push(s("title", { text: tip.join("\n") }));
    if (c.state === "pulling") {
      const pr = Math.max(0, Math.min(1, Number(c.progress) || 0));
      kids.push(s("rect", { class: "badge", x: 8, y: 5, width: 70, height: 15, rx: 4 }));
      kids.push(s("rect", { class: "progress", x: 8, y: 5, width: (70 * pr).toFixed(1), height: 15, rx: 4 }));
      kids.push(s("text", { class: "badge-text", x: 43, y: 16, "text-anchor": "middle", text: `pull ${Math.round(pr * 100)}%` }));
    } else {
      kids.push(s("rect", { class: "badge", x: 8, y: 5, width: 70, height: 15, rx: 4 }));
      kids.push(s("text", { class: "badge-text", x: 43, y: 16, "text-anchor": "middle", text: clip(c.state, 10) }));
    }
    kids.push(s("text", { class: "copy-name", x: 84, y: 16, text: clip(key, 18) }));
    kids.push(s("text", { class: "copy-rps", x: CW - 10, y: 16, "text-anchor": "end", text: `${fmtRate(c.rps)} req/s` }));
    let line2;
    if (c.state === "failed") line2 = clip(c.reason || "failed", 44);
    else
      line2 =
        `mem ${fmtBytes(c.memory_bytes)} · p50/p99 ${fmtMs(c.p50_ms)}/${fmtMs(c.p99_ms)} ms` +
        ` · q ${c.queue_depth ?? 0}`;
    kids.push(s("text", { class: "copy-detail", x: 10, y: 30, text: line2 }));
    return s("g", { class: `copy state-${st}`, "data-copy": key, transform: `translate(0,${y})` }, ...kids);
  }

  // ---------------------------------------------------------------- models panel
  const modelEls = new Map();
  let selectedModel = null;

  function renderModels(st) {
    const box = $("models");
    const models = (st.models || []).slice().sort((a, b) => cmpStr(String(a.name), String(b.name)));
    const keep = new Set(models.map((m) => String(m.name)));
    for (const [name, el] of modelEls) {
      if (!keep.has(name)) {
        el.remove();
        modelEls.delete(name);
      }
    }
    if (!models.length) {
      if (!box.querySelector(".empty")) box.appendChild(h("p", { class: "empty", text: "no models registered" }));
    } else {
      const e = box.querySelector(".empty");
      if (e) e.remove();
    }
    for (const m of models) {
      const name = String(m.name);
      let el = modelEls.get(name);
      if (!el) {
        el = h("div", { class: "model", "data-model": name, tabindex: 0, role: "button" });
        modelEls.set(name, el);
      }
      box.appendChild(el); // keeps sorted order (moves existing)
      el.classList.toggle("selected", name === selectedModel);
      el.classList.toggle("has-alarm", (m.alarms || []).length > 0);
      const sig = JSON.stringify(m);
      if (el.__sig !== sig) {
        el.__sig = sig;
        el.replaceChildren(...modelContent(m));
      }
    }
    const gone = document.getElementById("detail-gone");
    if (selectedModel && !keep.has(selectedModel) && !$("detail").hidden) {
      if (!gone) $("detail-body").prepend(h("p", { id: "detail-gone", class: "warn", text: "this model is no longer registered" }));
    } else if (gone) gone.remove();
  }

  const MIX_COLORS = 8;

  function modelContent(m) {
    const kids = [];
    const head = h("div", { class: "model-head" }, h("span", { class: "model-name", text: m.name }));
    head.appendChild(h("span", { class: "model-rps", text: `${fmtRate(m.rps)} req/s` }));
    if (m.slo_ms) {
      const hit = m.slo_hit_rate;
      const cls = hit === null || hit === undefined ? "slo" : hit >= 0.99 ? "slo good" : hit >= 0.9 ? "slo warn" : "slo bad";
      head.appendChild(
        h("span", {
          class: cls,
          text: `SLO ${fmtMs(m.slo_ms)} ms${hit === null || hit === undefined ? "" : " · " + fmtPct(hit, 1) + " met"}`,
        }),
      );
    }
    kids.push(head);

    // The live mix: stacked bar of variant shares.
    const variants = [];
    for (const v of m.versions || []) for (const va of v.variants || []) variants.push({ version: v.version, ...va });
    const multiVersion = (m.versions || []).length > 1;
    const label = (va) => (multiVersion ? `${va.version}/${va.variant}` : String(va.variant));
    const totalShare = variants.reduce((a, va) => a + (Number(va.share) || 0), 0);
    const bar = h("div", { class: "mix", title: "share of this model's queries now" });
    if (totalShare > 0) {
      variants.forEach((va, i) => {
        const sh = Number(va.share) || 0;
        if (sh <= 0) return;
        const seg = h("span", { class: `seg c${i % MIX_COLORS}`, title: `${label(va)}: ${fmtPct(sh)}` });
        seg.style.width = ((100 * sh) / Math.max(1, totalShare)).toFixed(2) + "%";
        bar.appendChild(seg);
      });
    } else {
      bar.classList.add("idle");
      bar.title = "no traffic now";
    }
    kids.push(bar);

    for (const a of m.aliases || []) {
      let txt = `${a.alias} → ${a.serving || a.version}`;
      if (a.serving && a.version && a.serving !== a.version) txt += ` (target ${a.version})`;
      if (a.canary_version && a.canary_percent)
        txt += ` · canary ${a.canary_version} ${Number(a.canary_percent).toFixed(0)} %${a.canary_active === false ? " (waiting)" : ""}`;
      const row = h("div", { class: "alias" }, txt);
      if (a.reason) row.appendChild(h("span", { class: "muted", text: ` — ${a.reason}` }));
      kids.push(row);
    }

    for (const al of m.alarms || []) {
      kids.push(
        h(
          "div",
          { class: `alarm alarm-${token(al.kind)}` },
          h("b", { text: `⚠ ${al.kind}` }),
          al.variant ? ` · ${al.variant}` : "",
          `: ${al.message || ""}`,
          al.since_ms ? h("span", { class: "muted", text: ` (since ${fmtTime(al.since_ms)})` }) : "",
        ),
      );
    }

    const table = h(
      "table",
      { class: "variants" },
      h(
        "thead",
        null,
        h(
          "tr",
          null,
          ["", "version", "variant", "ready", "acc", "req/s", "share"].map((t) => h("th", { text: t })),
        ),
      ),
    );
    const tb = h("tbody");
    variants.forEach((va, i) => {
      const ready = Number(va.ready) || 0;
      const desired = Number(va.desired) || 0;
      tb.appendChild(
        h(
          "tr",
          { "data-variant": `${va.version}/${va.variant}` },
          h("td", null, h("span", { class: `swatch c${i % MIX_COLORS}` })),
          h("td", { text: va.version }),
          h("td", { text: va.variant }),
          h("td", { class: ready < desired ? "warn" : "ok", text: `${ready}/${desired}` }),
          h("td", { text: va.accuracy === null || va.accuracy === undefined || va.accuracy === 0 ? "—" : Number(va.accuracy).toFixed(3) }),
          h("td", { text: fmtRate(va.rps) }),
          h("td", { text: fmtPct(va.share) }),
        ),
      );
      for (const [node, why] of Object.entries(va.failed || {})) {
        tb.appendChild(
          h("tr", { class: "failed-row" }, h("td"), h("td", { colspan: 6, text: `✗ failed on ${node}: ${why}` })),
        );
      }
    });
    table.appendChild(tb);
    kids.push(table);
    return kids;
  }

  // ---------------------------------------------------------------- detail pane
  let explainSeq = 0;

  function openDetail(name) {
    selectedModel = name;
    for (const [n, el] of modelEls) el.classList.toggle("selected", n === name);
    $("detail").hidden = false;
    $("detail-title").textContent = name;
    const body = $("detail-body");
    body.replaceChildren(
      h("section", { id: "explain", class: "explain" }, h("p", { class: "muted", text: "loading placement explanation…" })),
      h("section", { id: "detail-events", class: "detail-events" }),
    );
    renderDetailEvents();
    fetchExplain(name);
  }

  function closeDetail() {
    selectedModel = null;
    for (const el of modelEls.values()) el.classList.remove("selected");
    $("detail").hidden = true;
  }

  async function fetchExplain(name) {
    const my = ++explainSeq;
    const sec = () => document.getElementById("explain");
    let r;
    let body = null;
    try {
      r = await fetch(`/api/explain?model=${encodeURIComponent(name)}&variant=`, {
        credentials: "same-origin",
        cache: "no-store",
      });
      try {
        body = await r.json();
      } catch (_) {
        body = null;
      }
    } catch (_) {
      if (my === explainSeq && sec()) sec().replaceChildren(h("p", { class: "error", text: "cannot reach the server" }));
      return;
    }
    if (my !== explainSeq || !sec()) return;
    if (r.status === 401) {
      showLogin("session expired — sign in again");
      return;
    }
    if (!r.ok) {
      sec().replaceChildren(h("p", { class: "error", text: (body && body.error) || `HTTP ${r.status}` }));
      return;
    }
    sec().replaceChildren(...renderExplain(body || {}));
  }

  function renderExplain(ex) {
    const out = [h("h3", { text: "Placement" })];
    const res = ex.result || {};
    const vars = pick(res, "variants");
    if (!Array.isArray(vars)) {
      out.push(renderGeneric(res, 0));
      return out;
    }
    if (!vars.length) out.push(h("p", { class: "muted", text: "no variants to explain" }));
    for (const v of vars) {
      const sec = h("div", { class: "explain-variant" });
      sec.appendChild(h("h4", { text: `variant ${pick(v, "variant") || "default"}` }));
      const placed = pick(v, "placed") || [];
      const meta = [`desired ${pick(v, "desired_copies", "desiredCopies") ?? 0}`, `placed: ${placed.length ? placed.join(", ") : "none"}`];
      const pol = pick(v, "policy");
      if (pol) meta.push(`policy: ${pol}`);
      sec.appendChild(h("p", { class: "muted", text: meta.join(" · ") }));
      const nodes = pick(v, "nodes") || [];
      const feasible = (n) => {
        const f = pick(n, "feasible");
        if (f !== undefined) return !!f;
        return !pick(n, "filtered_by", "filteredBy");
      };
      const cands = nodes.filter(feasible);
      const filtered = nodes.filter((n) => !feasible(n));
      const plugins = [];
      for (const n of cands) for (const k of Object.keys(pick(n, "scores") || {})) if (!plugins.includes(k)) plugins.push(k);
      plugins.sort();
      if (cands.length) {
        const t = h(
          "table",
          { class: "explain-table candidates" },
          h("thead", null, h("tr", null, ["node", "score", ...plugins, "selected"].map((x) => h("th", { text: x })))),
        );
        const tb = h("tbody");
        for (const n of cands) {
          const sc = pick(n, "scores") || {};
          const sel = !!pick(n, "selected");
          tb.appendChild(
            h(
              "tr",
              { class: sel ? "selected" : "", "data-node": pick(n, "node_id", "nodeId") || "" },
              h("td", { text: pick(n, "node_id", "nodeId") || "?" }),
              h("td", { class: "num", text: Number(pick(n, "score") || 0).toFixed(3) }),
              plugins.map((p) => h("td", { class: "num", text: sc[p] === undefined ? "—" : Number(sc[p]).toFixed(2) })),
              h("td", { class: "sel", text: sel ? "✓" : "" }),
            ),
          );
        }
        t.appendChild(tb);
        sec.appendChild(h("h5", { text: `candidates (${cands.length})` }));
        sec.appendChild(t);
      } else {
        sec.appendChild(h("p", { class: "warn", text: "no feasible node" }));
      }
      if (filtered.length) {
        const t = h(
          "table",
          { class: "explain-table filtered" },
          h("thead", null, h("tr", null, ["node", "filtered_by", "reason"].map((x) => h("th", { text: x })))),
        );
        const tb = h("tbody");
        for (const n of filtered)
          tb.appendChild(
            h(
              "tr",
              { "data-node": pick(n, "node_id", "nodeId") || "" },
              h("td", { text: pick(n, "node_id", "nodeId") || "?" }),
              h("td", { class: "filter-name", text: pick(n, "filtered_by", "filteredBy") || "" }),
              h("td", { text: pick(n, "reason") || "" }),
            ),
          );
        t.appendChild(tb);
        sec.appendChild(h("h5", { text: `filtered out (${filtered.length})` }));
        sec.appendChild(t);
      }
      out.push(sec);
    }
    return out;
  }

  // Any JSON, readably: arrays of objects as tables, objects as key/value lists.
  function renderGeneric(v, depth) {
    if (v === null || v === undefined) return h("span", { class: "muted", text: "—" });
    if (depth > 4) return h("code", { text: JSON.stringify(v) });
    if (Array.isArray(v)) {
      if (v.length && v.every((x) => x && typeof x === "object" && !Array.isArray(x))) {
        const cols = [];
        for (const x of v) for (const k of Object.keys(x)) if (!cols.includes(k)) cols.push(k);
        return h(
          "table",
          { class: "explain-table" },
          h("thead", null, h("tr", null, cols.map((c) => h("th", { text: c })))),
          h(
            "tbody",
            null,
            v.map((x) => h("tr", null, cols.map((c) => h("td", null, renderGeneric(x[c], depth + 1))))),
          ),
        );
      }
      return h("span", { text: v.map((x) => (typeof x === "object" ? JSON.stringify(x) : String(x))).join(", ") });
    }
    if (typeof v === "object") {
      return h(
        "dl",
        { class: "generic" },
        Object.entries(v).map(([k, x]) => [h("dt", { text: k }), h("dd", null, renderGeneric(x, depth + 1))]),
      );
    }
    return h("span", { text: String(v) });
  }

  function renderDetailEvents() {
    const sec = document.getElementById("detail-events");
    if (!sec || !selectedModel) return;
    const mine = events.filter((e) => String(e.model ?? "") === selectedModel).slice(0, 40);
    const kids = [h("h3", { text: `Recent events (${mine.length})` })];
    if (!mine.length) kids.push(h("p", { class: "muted", text: "none in the timeline" }));
    else kids.push(h("div", { class: "timeline compact" }, mine.map(eventRow)));
    sec.replaceChildren(...kids);
  }

  // ---------------------------------------------------------------- timeline
  const events = []; // newest first, ≤ MAX_ROWS
  const rows = []; // parallel to events
  const seenKeys = new Set();
  const kinds = new Set();
  const evKey = (e) => `${e.seq}|${e.time_ms}|${e.kind}|${e.replica}`;
  const newer = (a, b) => (Number(a.time_ms) || 0) - (Number(b.time_ms) || 0) || (Number(a.seq) || 0) - (Number(b.seq) || 0);

  function eventRow(e) {
    const kind = String(e.kind ?? "");
    const mv = e.model ? `${e.model}${e.variant ? "/" + e.variant : ""}` : "";
    const row = h(
      "div",
      { class: `event kind-${token(kind)}`, "data-kind": kind },
      h("span", { class: "ev-time", text: fmtTime(e.time_ms), title: new Date(Number(e.time_ms) || 0).toISOString() }),
      h("span", { class: "ev-kind", text: kind || "?" }),
      h("span", { class: "ev-model", text: mv }),
      h("span", { class: "ev-node", text: e.node || "" }),
      h("span", { class: "ev-msg", text: e.message || "" }),
      h("span", { class: "ev-replica", text: e.replica || "" }),
    );
    return row;
  }

  function addEvents(list) {
    const box = $("timeline");
    let newKinds = false;
    let touched = false;
    for (const e of list) {
      if (!e || typeof e !== "object") continue;
      const k = evKey(e);
      if (seenKeys.has(k)) continue;
      // Insert newest first; usually at index 0.
      let i = 0;
      while (i < events.length && newer(events[i], e) > 0) i++;
      if (i >= MAX_ROWS) continue;
      seenKeys.add(k);
      const row = eventRow(e);
      applyFilterTo(row, e);
      if (i < rows.length) box.insertBefore(row, rows[i]);
      else box.appendChild(row);
      events.splice(i, 0, e);
      rows.splice(i, 0, row);
      touched = true;
      const kind = String(e.kind ?? "");
      if (kind && !kinds.has(kind)) {
        kinds.add(kind);
        newKinds = true;
      }
    }
    while (events.length > MAX_ROWS) {
      const old = events.pop();
      seenKeys.delete(evKey(old));
      rows.pop().remove();
    }
    if (newKinds) rebuildKindFilter();
    if (touched && selectedModel) renderDetailEvents();
  }

  function rebuildKindFilter() {
    const sel = $("kind-filter");
    const cur = sel.value;
    const opts = [h("option", { value: "", text: "All kinds" })];
    for (const k of [...kinds].sort()) opts.push(h("option", { value: k, text: k }));
    sel.replaceChildren(...opts);
    sel.value = kinds.has(cur) ? cur : "";
  }

  function applyFilterTo(row, e) {
    const kind = $("kind-filter").value;
    const text = $("text-filter").value.trim().toLowerCase();
    let show = !kind || String(e.kind ?? "") === kind;
    if (show && text) {
      const hay = `${e.model ?? ""} ${e.variant ?? ""} ${e.node ?? ""} ${e.message ?? ""}`.toLowerCase();
      show = hay.includes(text);
    }
    row.hidden = !show;
  }

  function applyFilters() {
    for (let i = 0; i < rows.length; i++) applyFilterTo(rows[i], events[i]);
  }

  // ---------------------------------------------------------------- wiring
  function init() {
    $("login-form").addEventListener("submit", doLogin);
    $("logout").addEventListener("click", doLogout);
    $("kind-filter").addEventListener("change", applyFilters);
    $("text-filter").addEventListener("input", applyFilters);
    $("detail-close").addEventListener("click", closeDetail);
    $("detail-refresh").addEventListener("click", () => {
      if (selectedModel) openDetail(selectedModel);
    });
    const models = $("models");
    models.addEventListener("click", (ev) => {
      const el = ev.target.closest("[data-model]");
      if (el) openDetail(el.getAttribute("data-model"));
    });
    models.addEventListener("keydown", (ev) => {
      if (ev.key !== "Enter" && ev.key !== " ") return;
      const el = ev.target.closest("[data-model]");
      if (!el) return;
      ev.preventDefault();
      openDetail(el.getAttribute("data-model"));
    });
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      if (resizeTimer) clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => {
        resizeTimer = null;
        if (state) renderMap(state);
      }, 150);
    });
    document.addEventListener("keydown", (ev) => {
      if (ev.key === "Escape" && !$("detail").hidden) closeDetail();
    });
    boot();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
