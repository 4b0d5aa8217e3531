// Baton's SLO page: polls /api/v1/slo (same origin, session cookie) and draws SVG.
// No library and no outside request; everything the CSP allows is this origin's own.
"use strict";

const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#58a6ff", "#d2a8ff", "#f0883e", "#3fb950", "#ff7b72"];
const COMPONENTS = ["router_queue", "prefill_queue", "prefill_compute", "kv_transfer",
  "first_decode_step"];
const POLL_MS = 2000;

function $(id) { return document.getElementById(id); }
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function svg(tag, attrs) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}
function pct(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%"; }
function secs(x) {
  if (x === null || x === undefined) return "–";
  return x < 1 ? (1000 * x).toFixed(x < 0.01 ? 2 : 0) + " ms" : x.toFixed(2) + " s";
}
function rate(x) {
  if (x === null || x === undefined) return "–";
  return (x >= 100 ? x.toFixed(0) : x >= 1 ? x.toFixed(2) : x.toPrecision(2)) + " req/s";
}
function num(x, d) { return x === null || x === undefined ? "–" : Number(x).toFixed(d || 0); }
function clock(t) { return new Date(t * 1000).toTimeString().slice(0, 8); }
function mark(panel, hasData) {
  const card = document.querySelector(`[data-panel="${panel}"]`);
  if (card) card.dataset.hasData = hasData ? "1" : "0";
}
function grade(value, objective) {
  if (value === null || value === undefined || objective === null) return "dim";
  if (value >= objective) return "good";
  return value >= objective - (1 - objective) ? "warn" : "bad";
}

function drawAttainment(d) {
  const box = $("attainment");
  box.replaceChildren();
  const objective = d.targets ? d.targets.objective : null;
  const predicted = d.plan ? d.plan.attainment : null;
  let any = false;
  for (const [name, w] of Object.entries(d.windows)) {
    const tile = el("div", { class: "tile" });
    tile.append(el("div", { class: "label" }, `last ${name} · ${w.judged} judged`));
    const joint = w.attainment.joint;
    any = any || w.judged > 0;
    tile.append(el("div", { class: "value " + grade(joint, objective) }, pct(joint)));
    const t = el("table");
    for (const c of ["ttft", "tpot"]) {
      const tr = el("tr");
      tr.append(el("td", { class: "dim" }, c.toUpperCase()));
      tr.append(el("td", { class: "num " + grade(w.attainment[c], objective) },
        pct(w.attainment[c])));
      t.append(tr);
    }
    tile.append(t);
    const parts = [];
    if (objective !== null) parts.push(`objective ${pct(objective)}`);
    if (predicted !== null) parts.push(`plan ${pct(predicted)}`);
    tile.append(el("div", { class: "sub" }, parts.join(" · ") || "no SLO set"));
    box.append(tile);
  }
  mark("attainment", any);
}

function drawGoodput(d) {
  const box = $("goodput");
  box.replaceChildren();
  const w = d.windows["60m"] || Object.values(d.windows).pop();
  const recent = d.windows["5m"] || w;
  const budget = w.error_budget_left;
  const tiles = [
    ["goodput (5m)", rate(recent.goodput_rps),
      `of ${rate(recent.throughput_rps)} finished ok` + (d.plan ? ` · plan max ${rate(d.plan.max_goodput_rps)}` : "")],
    ["budget left (60m)", pct(budget), d.targets ? `objective ${pct(d.targets.objective)}` : "no SLO set"],
    ["requests", w.requests, `ok ${w.outcomes.ok} · error ${w.outcomes.error}`],
    ["aborted / rejected", `${w.outcomes.aborted} / ${w.outcomes.rejected}`, "client left or refused"],
  ];
  for (const [label, value, sub] of tiles) {
    const tile = el("div", { class: "tile" });
    let cls = "value";
    if (label.startsWith("budget") && budget !== null) cls += budget > 0.25 ? " good" : budget > 0 ? " warn" : " bad";
    tile.append(el("div", { class: "label" }, label), el("div", { class: cls }, value),
      el("div", { class: "sub" }, sub));
    box.append(tile);
  }
  mark("goodput", w.requests > 0);
}

// A line chart of the series' points with an optional dashed target and dashed plan
// reference (the plan's predicted p90); null values are gaps.
function lineChart(box, points, lines, target, stacked, plan) {
  box.replaceChildren();
  const W = 560, H = 210, L = 52, R = 10, T = 10, B = 22;
  const values = [];
  for (const p of points) for (const s of lines) { const v = s.get(p); if (v !== null && v !== undefined) values.push(v); }
  if (stacked) for (const p of points) values.push(lines.reduce((a, s) => a + (s.get(p) || 0), 0));
  if (!values.length) { box.append(el("div", { class: "empty" }, "no requests in the last 10 minutes")); return false; }
  const ref = plan && plan.p90 !== null && plan.p90 !== undefined ? plan.p90 : null;
  let top = Math.max(...values, target || 0, ref || 0) * 1.15 || 1;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  const x = (i) => L + (W - L - R) * (points.length > 1 ? i / (points.length - 1) : 0.5);
  const y = (v) => T + (H - T - B) * (1 - v / top);
  for (let k = 0; k <= 4; k++) {
    const v = (top * k) / 4;
    root.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "axis" }));
    const label = svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" });
    label.textContent = secs(v);
    root.append(label);
  }
  for (const i of [0, Math.floor(points.length / 2), points.length - 1]) {
    const label = svg("text", { x: x(i), y: H - 6, "text-anchor": i === 0 ? "start" : i === points.length - 1 ? "end" : "middle" });
    label.textContent = clock(points[i].t);
    root.append(label);
  }
  if (stacked) {
    const bw = Math.max(2, (W - L - R) / points.length - 2);
    points.forEach((p, i) => {
      let base = 0;
      lines.forEach((s, k) => {
        const v = s.get(p) || 0;
        if (v > 0) root.append(svg("rect", { x: x(i) - bw / 2, y: y(base + v), width: bw, height: y(base) - y(base + v), fill: COLORS[k] }));
        base += v;
      });
    });
  } else {
    lines.forEach((s, k) => {
      let d = "", pen = false;
      points.forEach((p, i) => {
        const v = s.get(p);
        if (v === null || v === undefined) { pen = false; return; }
        d += `${pen ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
        pen = true;
        root.append(svg("circle", { cx: x(i), cy: y(v), r: 2, fill: COLORS[k] }));
      });
      if (d) root.append(svg("path", { d, fill: "none", stroke: COLORS[k], "stroke-width": 2 }));
    });
  }
  if (target) {
    root.append(svg("line", { x1: L, x2: W - R, y1: y(target), y2: y(target), stroke: "#f85149", "stroke-dasharray": "6 4", "stroke-width": 1.5 }));
  }
  if (ref !== null) {
    root.append(svg("line", { x1: L, x2: W - R, y1: y(ref), y2: y(ref), class: "plan-ref", stroke: "#d29922", "stroke-dasharray": "2 4", "stroke-width": 1.5 }));
  }
  box.append(root);
  const legend = el("div", { class: "legend" });
  lines.forEach((s, k) => { const i = el("span"); i.append(el("span", { class: `swatch c${k}` }), s.label); legend.append(i); });
  if (target) legend.append(el("span", { class: "bad" }, `target ${secs(target)}`));
  if (plan) {
    const known = (v) => (v === null ? "never" : secs(v));
    legend.append(el("span", { class: "warn plan-pred" },
      `plan p50 / p90 / p99 ${known(plan.p50)} / ${known(plan.p90)} / ${known(plan.p99)}`));
  }
  box.append(legend);
  return true;
}

// The series covers 10 minutes; start it at the first bucket with requests (at least
// the last 2 minutes shown), so a fresh server's chart is not mostly empty.
function trimmed(series) {
  const first = series.findIndex((p) => p.requests > 0);
  const keep = Math.min(series.length, Math.max(12, first < 0 ? 12 : series.length - first));
  return series.slice(series.length - keep);
}

function drawCharts(d) {
  const pts = trimmed(d.series);
  const tgt = d.targets || {};
  for (const metric of ["ttft", "tpot"]) {
    const lines = ["p50", "p90", "p99"].map((q) => ({ label: q, get: (p) => p[metric + "_s"][q] }));
    const predicted = d.plan ? d.plan[metric + "_s"] : null;
    mark(metric, lineChart($(metric), pts, lines, tgt[metric + "_s"], false, predicted));
  }
  const parts = COMPONENTS.map((c) => ({ label: c.replace(/_/g, " "), get: (p) => p.breakdown_s[c] }));
  mark("breakdown", lineChart($("breakdown"), pts, parts, null, true));
}

function table(headers, rows) {
  const t = el("table");
  const head = el("tr");
  for (const h of headers) head.append(el("th", { class: h.num ? "num" : "" }, h.label));
  t.append(head);
  for (const r of rows) t.append(r);
  return t;
}
// cells: values or nodes; numeric: which columns align right (as their headers do).
function row(cells, numeric) {
  const tr = el("tr");
  cells.forEach((c, i) => {
    const td = el("td", { class: numeric && numeric[i] ? "num" : "" });
    if (c instanceof Node) td.append(c); else td.textContent = c === null || c === undefined ? "–" : String(c);
    tr.append(td);
  });
  return tr;
}
function aligns(headers) { return headers.map((h) => !!h.num); }

function kvBar(usage) {
  if (usage === null) return "–";
  const s = svg("svg", { width: 90, height: 10, viewBox: "0 0 90 10" });
  s.append(svg("rect", { x: 0, y: 0, width: 90, height: 10, rx: 3, fill: "#26303b" }));
  const color = usage > 0.9 ? "#f85149" : usage > 0.7 ? "#d29922" : "#3fb950";
  s.append(svg("rect", { x: 0, y: 0, width: Math.max(1, 90 * usage), height: 10, rx: 3, fill: color }));
  const wrap = el("span");
  wrap.append(s, ` ${pct(usage)}`);
  return wrap;
}

function drawInstances(d) {
  const box = $("instances");
  box.replaceChildren();
  const heads = [{ label: "instance" }, { label: "node" }, { label: "state" }, { label: "queue", num: 1 },
    { label: "running", num: 1 }, { label: "KV cache" }, { label: "step", num: 1 }];
  const rows = [];
  const right = aligns(heads);
  for (const role of ["prefill", "decode", "colocated", ""]) {
    const members = d.instances.filter((i) => i.role === role);
    if (!members.length) continue;
    const tr = el("tr");
    tr.append(el("td", { class: "role", colspan: 7 }, role || "other"));
    rows.push(tr);
    for (const i of members) {
      rows.push(row([i.name, i.node || "–", el("span", { class: `pill ${i.state}` }, i.state),
        num(i.waiting), num(i.running), kvBar(i.kv_usage),
        i.step_ms === null ? "–" : `${num(i.step_ms, 1)} ms`], right));
    }
  }
  box.append(table(heads, rows));
  mark("instances", d.instances.length > 0);
}

function drawKv(d) {
  const box = $("kv");
  box.replaceChildren();
  const entries = Object.entries(d.kv_transfer);
  if (!entries.length) { box.append(el("div", { class: "empty" }, "no KV transfers in the window")); mark("kv", false); return; }
  const heads = [{ label: "backend" }, { label: "pulls", num: 1 }, { label: "p50", num: 1 },
    { label: "p99", num: 1 }, { label: "mean ÷ TTFT", num: 1 }];
  const rows = entries.map(([backend, k]) => row([backend, k.count, secs(k.p50_s), secs(k.p99_s), pct(k.share_of_ttft)], aligns(heads)));
  box.append(table(heads, rows));
  mark("kv", true);
}

function drawMisses(d) {
  const box = $("misses");
  box.replaceChildren();
  if (!d.misses.length) { box.append(el("div", { class: "empty" }, d.targets ? "no request missed its SLO" : "no SLO set (baton serve --slo-ttft/--slo-tpot or --plan)")); mark("misses", d.targets !== null); return; }
  const flag = (v, met) => el("span", { class: met ? "" : "bad" }, secs(v));
  const heads = [{ label: "time" }, { label: "request" }, { label: "model" }, { label: "prompt", num: 1 },
    { label: "output", num: 1 }, { label: "TTFT", num: 1 }, { label: "TPOT", num: 1 }, { label: "prefill" },
    { label: "decode" }, { label: "KV pull", num: 1 }];
  const rows = d.misses.map((m) => row([clock(m.t), m.request_id.slice(0, 12), m.model, m.prompt_tokens, m.output_tokens,
    flag(m.ttft_s, m.ttft_met), flag(m.tpot_s, m.tpot_met), m.prefill_instance, m.decode_instance, secs(m.kv_transfer_s)], aligns(heads)));
  box.append(table(heads, rows));
  mark("misses", true);
}

function drawHeader(d) {
  const t = $("targets");
  t.replaceChildren();
  if (d.targets) {
    t.append("TTFT ≤ ", el("b", {}, secs(d.targets.ttft_s)), " · TPOT ≤ ", el("b", {}, secs(d.targets.tpot_s)),
      " · objective ", el("b", {}, pct(d.targets.objective)));
  } else t.append("no SLO set");
  if (d.plan) t.append(" · plan: ", el("b", {}, pct(d.plan.attainment)), ` at ${num(d.plan.rate_rps, 2)} req/s`);
  const select = $("model");
  if (select.options.length === 1) for (const m of d.models) select.append(el("option", { value: m }, m));
  $("updated").textContent = `${d.model} · ${clock(d.time)}`;
}

async function refresh() {
  const model = $("model").value;
  const url = "/api/v1/slo" + (model ? "?model=" + encodeURIComponent(model) : "");
  let response;
  try { response = await fetch(url, { credentials: "same-origin", cache: "no-store" }); }
  catch (e) { $("updated").textContent = "server unreachable"; return; }
  if (response.status === 401) { window.location.reload(); return; }
  if (!response.ok) { $("updated").textContent = `error ${response.status}`; return; }
  const d = await response.json();
  drawHeader(d); drawAttainment(d); drawGoodput(d); drawCharts(d); drawInstances(d); drawKv(d); drawMisses(d);
  document.body.dataset.loaded = "1";
}

document.addEventListener("DOMContentLoaded", () => {
  $("model").addEventListener("change", refresh);
  refresh();
  setInterval(refresh, POLL_MS);
});
