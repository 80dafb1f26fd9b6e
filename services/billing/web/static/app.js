// gpumeter dashboard: vanilla JS over the billing JSON API, charts drawn as inline SVG.
// Money stays text (as the API gives it); sums are exact, in integer cents (BigInt).
"use strict";

const TOKEN_KEY = "gpumeter.token";
const SVG_NS = "http://www.w3.org/2000/svg";
const HK_OFFSET_MS = 8 * 3600 * 1000; // Asia/Hong_Kong is UTC+8 all year
const REFRESH_MS = 30000;
const SERIES_COLOURS = ["#2f5fa7", "#2e9e6b", "#d9822b", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d"];

const state = { token: "", period: "", loading: false };

// --- small helpers -------------------------------------------------------------------------------

function $(id) {
  return document.getElementById(id);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

// "1234567.89" -> "1,234,567.89", on the text itself so that nothing is lost to floating point.
function money(text) {
  if (text === null || text === undefined) return "-";
  const negative = text.startsWith("-");
  const [whole, fraction] = (negative ? text.slice(1) : text).split(".");
  const grouped = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return (negative ? "-" : "") + grouped + (fraction !== undefined ? "." + fraction : "");
}

function cents(text) {
  if (!text) return 0n;
  const negative = text.startsWith("-");
  const [whole, fraction = ""] = (negative ? text.slice(1) : text).split(".");
  const value = BigInt(whole || "0") * 100n + BigInt((fraction + "00").slice(0, 2));
  return negative ? -value : value;
}

function fromCents(value) {
  const negative = value < 0n;
  const magnitude = negative ? -value : value;
  const text = `${magnitude / 100n}.${String(magnitude % 100n).padStart(2, "0")}`;
  return negative ? "-" + text : text;
}

function hkTime(iso, withTime = true) {
  const shifted = new Date(Date.parse(iso) + HK_OFFSET_MS).toISOString();
  return withTime ? `${shifted.slice(0, 10)} ${shifted.slice(11, 16)} HKT` : shifted.slice(0, 10);
}

function setStatus(text, isError = false) {
  const node = $("status");
  node.textContent = text;
  node.classList.toggle("error", isError);
}

function empty(id, text) {
  const node = $(id);
  node.textContent = text || "";
  node.hidden = !text;
}

// --- token and URL -------------------------------------------------------------------------------

function readHash() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  const token = params.get("token");
  if (token) {
    localStorage.setItem(TOKEN_KEY, token);
    params.delete("token"); // keep the token out of the address bar and history
  }
  if (params.get("period")) state.period = params.get("period");
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
  state.token = localStorage.getItem(TOKEN_KEY) || "";
}

function writeHash() {
  history.replaceState(null, "", `${location.pathname}${location.search}#period=${state.period}`);
}

async function api(path) {
  if (!state.token) return { ok: false, status: 401, body: { error: "unauthorized", detail: "no token" } };
  let response;
  try {
    response = await fetch(path, { headers: { Authorization: `Bearer ${state.token}` } });
  } catch (error) {
    return { ok: false, status: 0, body: { error: "network", detail: String(error) } };
  }
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = { error: "not_json", detail: String(error) };
  }
  return { ok: response.ok, status: response.status, body };
}

function problem(result) {
  if (result.status === 403) return "This token may not see this (it needs a billing or admin token).";
  if (result.status === 401 && state.token.split(".").length === 3)
    return "Your sign-in has expired or is not accepted here: sign in again.";
  if (result.status === 401) return "Paste an API token above, or sign in, to see this.";
  if (result.status === 0) return "The billing service cannot be reached.";
  const detail = result.body && result.body.detail;
  return `Error ${result.status}: ${(result.body && result.body.error) || "unknown"}${
    typeof detail === "string" ? " - " + detail : ""
  }`;
}

async function download(event) {
  event.preventDefault();
  const link = event.currentTarget;
  const response = await fetch(link.getAttribute("href"), {
    headers: { Authorization: `Bearer ${state.token}` },
  });
  if (!response.ok) {
    setStatus(`Download failed: HTTP ${response.status}`, true);
    return;
  }
  const url = URL.createObjectURL(await response.blob());
  const save = el("a", { href: url, download: link.dataset.filename });
  document.body.append(save);
  save.click();
  save.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// --- loading -------------------------------------------------------------------------------------

async function load() {
  if (state.loading) return;
  state.loading = true;
  document.body.removeAttribute("data-loaded");
  setStatus("Loading...");
  try {
    const info = await api("/dashboard/api/info");
    if (!info.ok) {
      renderSignedOut(info);
      return;
    }
    choosePeriod(info.body);
    const period = encodeURIComponent(state.period);
    const [invoices, catalog, centre, cap, alerts, completeness, audit, efficiency] = await Promise.all([
      api(`/v1/invoices?period=${period}`),
      api("/v1/catalog"),
      api(`/dashboard/api/centre?period=${period}`),
      api("/dashboard/api/cap"),
      api("/dashboard/api/alerts"),
      api(`/v1/periods/${period}/completeness`),
      api("/v1/audit?limit=20"),
      api(`/v1/efficiency?period=${period}`),
    ]);
    const names = {};
    if (catalog.ok) for (const project of catalog.body.projects) names[project.id] = project.name;
    renderInvoices(invoices, names);
    renderCentre(centre);
    renderCap(cap);
    renderAlerts(alerts);
    renderCompleteness(completeness, invoices);
    renderAudit(audit);
    renderEfficiency(efficiency, names);
    const now = new Date();
    setStatus(
      `Period ${state.period}${periodNote(info.body)}. Updated ${now.toLocaleTimeString()}; refreshes every ${
        REFRESH_MS / 1000
      } s.`,
      !invoices.ok
    );
  } finally {
    state.loading = false;
    document.body.setAttribute("data-loaded", "true");
  }
}

function periodNote(info) {
  const known = info.periods.find((p) => p.period === state.period);
  if (known && known.finalized) return " (finalized)";
  return state.period === info.current_period ? " (current, drafts)" : "";
}

function choosePeriod(info) {
  const periods = new Map(info.periods.map((p) => [p.period, p.finalized]));
  if (!periods.has(info.current_period)) periods.set(info.current_period, false);
  if (!/^\d{4}-\d{2}$/.test(state.period)) {
    const withInvoices = info.periods.map((p) => p.period);
    state.period = withInvoices.includes(info.current_period)
      ? info.current_period
      : withInvoices[0] || info.current_period;
  }
  if (!periods.has(state.period)) periods.set(state.period, false);
  const select = $("period");
  select.replaceChildren();
  for (const period of [...periods.keys()].sort().reverse()) {
    const label = period + (periods.get(period) ? " (finalized)" : "");
    select.append(el("option", { value: period, selected: period === state.period, text: label }));
  }
  writeHash();
}

function renderSignedOut(result) {
  setStatus(problem(result), true);
  const message = state.token ? problem(result) : "Paste an API token above, or sign in, to see invoices.";
  $("invoice-rows").replaceChildren();
  $("cap-rows").replaceChildren();
  $("audit-rows").replaceChildren();
  $("efficiency-rows").replaceChildren();
  $("alert-list").replaceChildren();
  $("incomplete-hours").replaceChildren();
  for (const id of ["centre-chart", "spend-chart", "cap-chart"]) $(id).replaceChildren();
  $("centre-facts").textContent = "";
  $("completeness-text").textContent = "";
  for (const id of ["total-gross", "total-subsidy", "total-net", "invoice-count", "completeness-status"]) {
    $(id).textContent = "-";
  }
  empty("invoices-empty", message);
  empty("cap-empty", message);
  empty("alerts-empty", message);
  empty("audit-empty", message);
  empty("efficiency-empty", message);
}

// --- invoices: totals, table, spend chart ---------------------------------------------------------

function renderInvoices(result, names) {
  const rows = $("invoice-rows");
  rows.replaceChildren();
  $("spend-chart").replaceChildren();
  if (!result.ok) {
    for (const id of ["total-gross", "total-subsidy", "total-net", "invoice-count"]) $(id).textContent = "-";
    empty("invoices-empty", problem(result));
    return;
  }
  const invoices = result.body.invoices;
  let gross = 0n;
  let subsidy = 0n;
  let net = 0n;
  for (const invoice of invoices) {
    gross += cents(invoice.gross_hkd);
    subsidy += cents(invoice.subsidy_hkd);
    net += cents(invoice.net_hkd);
    const id = encodeURIComponent(invoice.invoice_id);
    const project = el("td", {}, el("span", { "data-testid": "project-id", text: invoice.project_id }));
    if (names[invoice.project_id]) project.append(el("div", { class: "muted", text: names[invoice.project_id] }));
    for (const flag of invoice.flags || []) project.append(el("span", { class: "flag", text: flag.replaceAll("_", " ") }));
    rows.append(
      el(
        "tr",
        { "data-testid": "invoice-row", "data-project": invoice.project_id, "data-invoice": invoice.invoice_id },
        project,
        el("td", { "data-testid": "invoice-id", text: invoice.invoice_id }),
        el("td", {}, el("span", { class: `badge ${invoice.status}`, "data-testid": "invoice-status", text: invoice.status })),
        el("td", { class: "num", "data-testid": "gross", text: money(invoice.gross_hkd) }),
        el("td", { class: "num", "data-testid": "subsidy", text: money(invoice.subsidy_hkd) }),
        el("td", { class: "num", "data-testid": "net", text: money(invoice.net_hkd) }),
        el("td", { class: "num", "data-testid": "cap-remaining", text: money(invoice.subsidy_cap_remaining_hkd) }),
        el(
          "td",
          {},
          downloadLink(`/v1/invoices/${id}.pdf`, `${invoice.invoice_id}.pdf`, "PDF", "pdf-link"),
          downloadLink(`/v1/invoices/${id}.csv`, `${invoice.invoice_id}.csv`, "CSV", "csv-link")
        )
      )
    );
  }
  $("total-gross").textContent = money(fromCents(gross));
  $("total-subsidy").textContent = money(fromCents(subsidy));
  $("total-net").textContent = money(fromCents(net));
  $("invoice-count").textContent = String(invoices.length);
  empty("invoices-empty", invoices.length ? "" : `No invoices for ${state.period}: no billable usage yet.`);
  if (invoices.length) drawSpend(invoices);
}

function downloadLink(href, filename, label, testid) {
  const link = el("a", { href, "data-filename": filename, "data-testid": testid, text: label });
  link.addEventListener("click", download);
  return link;
}

function drawSpend(invoices) {
  const sorted = [...invoices].sort((a, b) => Number(cents(b.gross_hkd) - cents(a.gross_hkd)));
  const shown = sorted.slice(0, 15);
  const max = Math.max(1, ...shown.map((i) => Number(cents(i.gross_hkd))));
  const rowHeight = 22;
  const labelWidth = 170;
  const width = 900;
  const plot = width - labelWidth - 150;
  const height = shown.length * rowHeight + 30;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "spend per project" });
  shown.forEach((invoice, index) => {
    const y = index * rowHeight + 4;
    const netWidth = (Number(cents(invoice.net_hkd)) / max) * plot;
    const subsidyWidth = (Number(cents(invoice.subsidy_hkd)) / max) * plot;
    chart.append(svg("text", { x: labelWidth - 6, y: y + 13, "text-anchor": "end" }, invoice.project_id));
    chart.append(svg("rect", { class: "net", x: labelWidth, y, width: Math.max(0, netWidth), height: rowHeight - 6 }));
    chart.append(
      svg("rect", { class: "subsidy", x: labelWidth + netWidth, y, width: Math.max(0, subsidyWidth), height: rowHeight - 6 })
    );
    chart.append(
      svg("text", { x: labelWidth + netWidth + subsidyWidth + 6, y: y + 13 }, `HK$ ${money(invoice.gross_hkd)}`)
    );
  });
  const legendY = shown.length * rowHeight + 20;
  chart.append(svg("rect", { class: "net", x: labelWidth, y: legendY - 9, width: 10, height: 10 }));
  chart.append(svg("text", { x: labelWidth + 14, y: legendY }, "payable by the project"));
  chart.append(svg("rect", { class: "subsidy", x: labelWidth + 160, y: legendY - 9, width: 10, height: 10 }));
  chart.append(svg("text", { x: labelWidth + 174, y: legendY }, "paid by the subsidy scheme"));
  if (sorted.length > shown.length) {
    chart.append(svg("text", { x: width - 4, y: legendY, "text-anchor": "end" }, `top ${shown.length} of ${sorted.length}`));
  }
  $("spend-chart").append(chart);
}

// --- centre allocation and utilization ------------------------------------------------------------

function renderCentre(result) {
  const box = $("centre-chart");
  box.replaceChildren();
  const facts = $("centre-facts");
  if (!result.ok) {
    facts.textContent = problem(result);
    return;
  }
  const hours = result.body.hours;
  if (!hours.length) {
    facts.textContent = `No usage reported for ${state.period} yet.`;
    return;
  }
  const nodes = hours.map((h) => h.nodes_online).filter((n) => n !== null);
  facts.replaceChildren(
    "Allocated: ",
    el("b", { "data-testid": "allocated-gpu-hours", text: result.body.allocated_gpu_hours }),
    " GPU-hours; peak ",
    el("b", { "data-testid": "peak-allocated-gpus", text: result.body.peak_allocated_gpus }),
    " GPUs (hourly average); mean utilization of allocated GPUs ",
    el("b", { "data-testid": "mean-util", text: result.body.mean_util_pct === null ? "-" : result.body.mean_util_pct + "%" }),
    nodes.length ? `; up to ${Math.max(...nodes)} nodes online.` : "."
  );
  box.append(drawCentre(hours));
}

function drawCentre(hours) {
  const width = 900;
  const height = 260;
  const left = 50;
  const right = 50;
  const top = 26;
  const bottom = 36;
  const hourMs = 3600 * 1000;
  const first = Date.parse(hours[0].hour_start);
  const last = Date.parse(hours[hours.length - 1].hour_start);
  const start = Math.min(first, last - 23 * hourMs); // at least a day, so one hour is not the whole chart
  const slots = Math.round((last - start) / hourMs) + 1;
  const plotWidth = width - left - right;
  const plotHeight = height - top - bottom;
  const slot = plotWidth / slots;
  const maxGpus = niceCeiling(Math.max(...hours.map((h) => Number(h.allocated_gpus))));
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "centre allocation and utilization" });
  // Axes and grid
  for (let i = 0; i <= 4; i += 1) {
    const y = top + plotHeight - (plotHeight * i) / 4;
    chart.append(svg("line", { class: "axis", x1: left, x2: width - right, y1: y, y2: y }));
    chart.append(svg("text", { x: left - 6, y: y + 4, "text-anchor": "end" }, formatCount((maxGpus * i) / 4)));
    chart.append(svg("text", { x: width - right + 6, y: y + 4 }, `${25 * i}%`));
  }
  chart.append(svg("text", { x: left, y: 12, "text-anchor": "end" }, "GPUs"));
  chart.append(svg("text", { x: width - right + 6, y: 12 }, "util"));
  // Day ticks at Hong Kong midnight
  const dayMs = 24 * hourMs;
  const days = Math.ceil(slots / 24);
  const stride = Math.max(1, Math.ceil(days / 8));
  let tick = Math.ceil((start + HK_OFFSET_MS) / dayMs) * dayMs - HK_OFFSET_MS;
  for (let day = 0; tick <= last + hourMs; day += 1, tick += dayMs) {
    if (day % stride) continue;
    const x = left + ((tick - start) / hourMs) * slot;
    chart.append(svg("line", { class: "axis", x1: x, x2: x, y1: top + plotHeight, y2: top + plotHeight + 5 }));
    chart.append(svg("text", { x, y: height - 14, "text-anchor": "middle" }, hkTime(new Date(tick).toISOString(), false).slice(5)));
  }
  // Bars: allocated GPUs; an hour metering reports incomplete is red
  const points = [];
  for (const hour of hours) {
    const at = Date.parse(hour.hour_start);
    const x = left + ((at - start) / hourMs) * slot;
    const gpus = Number(hour.allocated_gpus);
    const barHeight = maxGpus ? (gpus / maxGpus) * plotHeight : 0;
    const bar = svg("rect", {
      class: hour.complete === false ? "bar-incomplete" : "bar-alloc",
      x: x + slot * 0.1,
      y: top + plotHeight - barHeight,
      width: Math.max(1, slot * 0.8),
      height: barHeight,
    });
    bar.append(
      svg(
        "title",
        {},
        `${hkTime(hour.hour_start)}: ${hour.allocated_gpus} GPUs allocated, utilization ${
          hour.util_pct === null ? "-" : hour.util_pct + "%"
        }, ${hour.nodes_online === null ? "?" : hour.nodes_online} nodes online${
          hour.complete === false ? " (incomplete)" : ""
        }`
      )
    );
    chart.append(bar);
    if (hour.util_pct !== null) {
      points.push([x + slot / 2, top + plotHeight - (Number(hour.util_pct) / 100) * plotHeight]);
    }
  }
  if (points.length > 1) {
    chart.append(svg("polyline", { class: "line-util", points: points.map(([px, py]) => `${px.toFixed(1)},${py.toFixed(1)}`).join(" ") }));
  }
  if (points.length <= 48) {
    for (const [px, py] of points) chart.append(svg("circle", { class: "dot-util", cx: px.toFixed(1), cy: py.toFixed(1), r: 3 }));
  }
  return chart;
}

function niceCeiling(value) {
  if (value <= 0) return 1;
  const magnitude = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * magnitude >= value) return step * magnitude;
  return 10 * magnitude;
}

function formatCount(value) {
  return Number.isInteger(value) ? String(value) : value.toFixed(1);
}

// --- efficiency and top jobs --------------------------------------------------------------------------

function renderEfficiency(result, names) {
  const rows = $("efficiency-rows");
  rows.replaceChildren();
  if (!result.ok) {
    empty("efficiency-empty", problem(result));
    return;
  }
  const projects = result.body.projects;
  empty("efficiency-empty", projects.length ? "" : `No job usage reported for ${result.body.period}.`);
  for (const project of projects) {
    const top = el("ol", { class: "jobs" });
    for (const job of project.top_jobs) {
      top.append(
        el("li", {
          "data-testid": "top-job",
          text: `${job.job_id ?? "(no job id)"}: ${job.gpu_hours.replace(/0+$/, "").replace(/\.$/, "")} GPU-h, ${money(job.list_cost_hkd)}`,
        })
      );
    }
    rows.append(
      el(
        "tr",
        { "data-testid": "efficiency-row", "data-project": project.project_id },
        el("td", { title: names[project.project_id] || "", text: project.project_id }),
        el("td", { class: "num", "data-testid": "eff-gpu-hours", text: project.gpu_hours }),
        el("td", {
          class: "num",
          "data-testid": "eff-idle-hours",
          text: `${project.idle_gpu_hours}${project.idle_share_pct === null ? "" : ` (${project.idle_share_pct}%)`}`,
        }),
        el("td", { class: "num", "data-testid": "eff-idle-cost", text: money(project.idle_list_cost_hkd) }),
        el("td", { class: "num", text: project.mean_util_pct === null ? "-" : `${project.mean_util_pct}%` }),
        el("td", { class: "num", "data-testid": "eff-energy", text: project.energy_kwh }),
        el("td", {}, top)
      )
    );
  }
}

// --- audit trail ------------------------------------------------------------------------------------

function auditSummary(entry) {
  const d = entry.details || {};
  switch (entry.action) {
    case "catalog.apply":
      return d.summary || "catalog applied";
    case "period.finalize":
    case "period.finalize_forced":
      return `${d.invoices} invoices${d.invoice_numbers && d.invoice_numbers.length ? ` (${d.invoice_numbers.join(" to ")})` : ""}`;
    case "credit_note.issue":
      return `${d.credit_note_number} against ${d.invoice_number || d.invoice_id}: ${money(d.net_hkd)} HKD; ${d.reason}`;
    default:
      return "";
  }
}

function renderAudit(result) {
  const rows = $("audit-rows");
  rows.replaceChildren();
  if (!result.ok) {
    empty("audit-empty", result.status === 403 ? "The audit trail is shown to admin tokens only." : problem(result));
    return;
  }
  const entries = result.body.entries;
  empty("audit-empty", entries.length ? "" : "Nothing has been changed yet.");
  for (const entry of entries) {
    rows.append(
      el(
        "tr",
        { "data-testid": "audit-row", "data-action": entry.action },
        el("td", { class: "muted", text: new Date(entry.at).toLocaleString() }),
        el("td", { text: entry.actor }),
        el("td", { text: entry.action }),
        el("td", { text: entry.subject || "" }),
        el("td", { text: auditSummary(entry) })
      )
    );
  }
}

// --- subsidy cap burn-down ------------------------------------------------------------------------

function renderCap(result) {
  const rows = $("cap-rows");
  rows.replaceChildren();
  $("cap-chart").replaceChildren();
  if (!result.ok) {
    empty("cap-empty", problem(result));
    return;
  }
  const projects = result.body.projects;
  empty("cap-empty", projects.length ? "" : "No project has a subsidy approval in the catalog.");
  for (const project of projects) {
    const cap = cents(project.cap_hkd);
    const used = cents(project.used_hkd);
    const share = cap > 0n ? Number((used * 10000n) / cap) / 100 : 0;
    const meter = el("div", { class: `meter${share >= 100 ? " full" : share >= 80 ? " high" : ""}` });
    meter.append(el("span", { style: `width: ${Math.min(100, share)}%` }));
    rows.append(
      el(
        "tr",
        { "data-testid": "cap-row", "data-project": project.project_id },
        el("td", { title: project.name, text: project.project_id }),
        el("td", { text: project.scheme }),
        el("td", { class: "num", text: project.subsidy_rate }),
        el("td", { class: "num", "data-testid": "cap", text: money(project.cap_hkd) }),
        el("td", { class: "num", "data-testid": "cap-used", text: money(project.used_hkd) }),
        el("td", { class: "num", "data-testid": "cap-left", text: money(project.cap_remaining_hkd) }),
        el("td", {}, meter, el("span", { class: "muted", text: `${share.toFixed(1)}%` })),
        el("td", { class: "num", "data-testid": "cap-burn", text: project.burn_hkd_per_day ?? "-" }),
        el("td", {
          "data-testid": "cap-runs-out",
          class: project.cap_exhausted_on ? "warn" : "muted",
          text: project.cap_exhausted_on || "not before the approval ends",
        }),
        el("td", { class: "muted", text: `${project.valid_from} to ${project.valid_to}` })
      )
    );
  }
  const charted = projects.filter((p) => p.points.length && cents(p.cap_hkd) > 0n);
  if (charted.length) $("cap-chart").append(drawCap(charted.slice(0, SERIES_COLOURS.length)));
}

function drawCap(projects) {
  const width = 560;
  const height = 220;
  const left = 44;
  const right = 130;
  const top = 10;
  const bottom = 30;
  const periods = [...new Set(projects.flatMap((p) => p.points.map((point) => point.period)))].sort();
  const columns = ["start", ...periods];
  const plotWidth = width - left - right;
  const plotHeight = height - top - bottom;
  const x = (index) => left + (columns.length === 1 ? 0 : (plotWidth * index) / (columns.length - 1));
  const y = (share) => top + plotHeight - (plotHeight * share) / 100;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "subsidy cap burn-down" });
  for (let i = 0; i <= 4; i += 1) {
    chart.append(svg("line", { class: "axis", x1: left, x2: left + plotWidth, y1: y(25 * i), y2: y(25 * i) }));
    chart.append(svg("text", { x: left - 6, y: y(25 * i) + 4, "text-anchor": "end" }, `${25 * i}%`));
  }
  const stride = Math.max(1, Math.ceil(columns.length / 8));
  columns.forEach((label, index) => {
    if (index % stride === 0) chart.append(svg("text", { x: x(index), y: height - 10, "text-anchor": "middle" }, label));
  });
  projects.forEach((project, index) => {
    const colour = SERIES_COLOURS[index];
    const cap = cents(project.cap_hkd);
    const points = [`${x(0)},${y(100)}`];
    for (const point of project.points) {
      if (point.cap_remaining_hkd === null) continue;
      const share = Number((cents(point.cap_remaining_hkd) * 10000n) / cap) / 100;
      points.push(`${x(columns.indexOf(point.period)).toFixed(1)},${y(Math.max(0, share)).toFixed(1)}`);
    }
    chart.append(svg("polyline", { points: points.join(" "), fill: "none", stroke: colour, "stroke-width": 2 }));
    chart.append(svg("rect", { x: width - right + 10, y: top + index * 16, width: 10, height: 10, fill: colour }));
    chart.append(svg("text", { x: width - right + 24, y: top + index * 16 + 9 }, project.project_id));
  });
  return chart;
}

// --- alerts ---------------------------------------------------------------------------------------

function renderAlerts(result) {
  const list = $("alert-list");
  list.replaceChildren();
  if (!result.ok) {
    empty("alerts-empty", problem(result));
    return;
  }
  const body = result.body;
  if (!body.configured) {
    empty("alerts-empty", "Alerts service not configured (set ALERTS_URL for the billing service).");
    return;
  }
  if (!body.reachable) {
    empty("alerts-empty", `Alerts service not reachable: ${body.error || "no answer"}.`);
    return;
  }
  empty("alerts-empty", body.alerts.length ? "" : "No active alerts.");
  const order = { critical: 0, warning: 1 };
  const alerts = [...body.alerts].sort(
    (a, b) => (order[a.labels.severity] ?? 2) - (order[b.labels.severity] ?? 2) || a.rule.localeCompare(b.rule)
  );
  for (const alert of alerts) {
    const labels = alert.labels || {};
    const annotations = alert.annotations || {};
    const since = alert.starts_at || alert.pending_since;
    const others = Object.entries(labels)
      .filter(([key]) => key !== "alertname" && key !== "severity")
      .map(([key, value]) => `${key}=${value}`)
      .join(", ");
    list.append(
      el(
        "li",
        { "data-testid": "alert", "data-fingerprint": alert.fingerprint, "data-status": alert.status },
        el("span", { class: `badge ${labels.severity || ""}`, text: labels.severity || "alert" }),
        " ",
        el("b", { "data-testid": "alert-name", text: labels.alertname || alert.rule }),
        ` ${alert.status}${since ? " since " + hkTime(since) : ""}`,
        annotations.summary ? el("div", { text: annotations.summary }) : null,
        others ? el("div", { class: "labels", text: others }) : null
      )
    );
  }
}

// --- completeness ---------------------------------------------------------------------------------

function renderCompleteness(result, invoices) {
  const list = $("incomplete-hours");
  list.replaceChildren();
  const text = $("completeness-text");
  const badge = $("completeness-status");
  let summary = null;
  if (result.ok) {
    summary = {
      status: result.body.status,
      hours_with_usage: result.body.hours_with_usage,
      complete_hours: result.body.complete_hours,
      incomplete_hours: result.body.incomplete_hours.length,
      unknown_hours: result.body.unknown_hours.length,
    };
  } else if (invoices.ok) {
    summary = invoices.body.completeness; // project tokens: the summary the invoice list carries
  }
  if (!summary) {
    badge.textContent = "-";
    text.textContent = problem(result);
    return;
  }
  badge.replaceChildren(el("span", { class: `badge ${summary.status}`, text: summary.status }));
  const meaning = {
    complete: "Every hour with usage is reported complete by metering; the period can be finalized.",
    incomplete: "Metering reports hours with usage as incomplete; finalization is refused until they complete (or forced).",
    unknown: "Some hours with usage have no completeness record from metering yet.",
  };
  text.replaceChildren(
    `${summary.hours_with_usage} ${summary.hours_with_usage === 1 ? "hour" : "hours"} with usage: `,
    el("b", { "data-testid": "complete-hours", text: String(summary.complete_hours) }),
    " complete, ",
    el("b", { "data-testid": "incomplete-hour-count", text: String(summary.incomplete_hours) }),
    " incomplete, ",
    el("b", { "data-testid": "unknown-hour-count", text: String(summary.unknown_hours) }),
    ` unknown. ${summary.hours_with_usage ? meaning[summary.status] || "" : "No usage in this period yet."}`
  );
  if (result.ok) {
    for (const hour of result.body.incomplete_hours.slice(0, 24)) {
      list.append(
        el("li", {
          text: `${hkTime(hour.hour_start)}: ${hour.nodes_through}/${hour.nodes_online} nodes through${
            hour.missing_nodes.length ? "; waiting for " + hour.missing_nodes.slice(0, 10).join(", ") : ""
          }`,
        })
      );
    }
    if (result.body.incomplete_hours.length > 24) {
      list.append(el("li", { class: "muted", text: `and ${result.body.incomplete_hours.length - 24} more` }));
    }
  }
}

// --- single sign-on: OpenID Connect authorization code with PKCE (a public client) ---------------

const SIGN_IN_KEY = "gpumeter.sign-in"; // sessionStorage: the verifier and state of a sign-in under way

function base64url(bytes) {
  return btoa(String.fromCharCode(...new Uint8Array(bytes)))
    .replace(/\+/g, "-")
    .replace(/\//g, "_")
    .replace(/=+$/, "");
}

function randomText(bytes) {
  return base64url(crypto.getRandomValues(new Uint8Array(bytes)));
}

function redirectUri() {
  return `${location.origin}/dashboard`;
}

async function signInSettings() {
  try {
    const response = await fetch("/dashboard/api/sign-in");
    const body = await response.json();
    return body && body.enabled && response.ok ? body : null;
  } catch (error) {
    return null;
  }
}

async function beginSignIn(sso) {
  const verifier = randomText(48);
  const challenge = base64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
  const stateText = randomText(16);
  sessionStorage.setItem(SIGN_IN_KEY, JSON.stringify({ verifier, state: stateText, period: state.period }));
  const query = new URLSearchParams({
    response_type: "code",
    client_id: sso.client_id,
    redirect_uri: redirectUri(),
    scope: sso.scope,
    state: stateText,
    code_challenge: challenge,
    code_challenge_method: "S256",
  });
  location.assign(`${sso.authorization_endpoint}?${query}`);
}

// Back from the provider with ?code=...&state=...: trade the code for a token, keep the token
// like a pasted one, and take the code out of the address bar. Returns a problem, or "".
async function finishSignIn(sso) {
  const params = new URLSearchParams(location.search);
  const code = params.get("code");
  const error = params.get("error");
  if (!code && !error) return "";
  const pending = JSON.parse(sessionStorage.getItem(SIGN_IN_KEY) || "null");
  sessionStorage.removeItem(SIGN_IN_KEY);
  history.replaceState(null, "", location.pathname + location.hash);
  if (error) return `Sign-in refused by the identity provider: ${error}`;
  if (!pending || pending.state !== params.get("state")) return "Sign-in failed: its state does not match; try again.";
  if (!sso) return "Sign-in failed: single sign-on is not configured.";
  if (pending.period) state.period = pending.period;
  let response;
  try {
    response = await fetch(sso.token_endpoint, {
      method: "POST",
      headers: { "Content-Type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({
        grant_type: "authorization_code",
        code,
        redirect_uri: redirectUri(),
        client_id: sso.client_id,
        code_verifier: pending.verifier,
      }),
    });
  } catch (err) {
    return `Sign-in failed: the identity provider cannot be reached (${err})`;
  }
  const body = await response.json().catch(() => ({}));
  // The access token only: an ID token says who signed in, to this client; it is no API bearer.
  const token = body.access_token;
  if (!response.ok) return `Sign-in failed: ${body.error || "HTTP " + response.status}`;
  if (!token) return "Sign-in failed: the identity provider sent no access token";
  state.token = token;
  localStorage.setItem(TOKEN_KEY, token);
  return "";
}

// Who a sign-on token names (read from its payload for display only: the server verifies it).
function signedInAs(token) {
  const parts = (token || "").split(".");
  if (parts.length !== 3) return "";
  try {
    const claims = JSON.parse(atob(parts[1].replace(/-/g, "+").replace(/_/g, "/")));
    return claims.name || claims.preferred_username || claims.email || claims.sub || "";
  } catch (error) {
    return "";
  }
}

function showWho() {
  const who = signedInAs(state.token);
  $("who").textContent = who ? `Signed in as ${who}` : "";
}

// --- start ----------------------------------------------------------------------------------------

async function start() {
  readHash();
  const sso = await signInSettings();
  const signInProblem = await finishSignIn(sso);
  if (sso) {
    $("sign-in").hidden = false;
    $("sign-in").addEventListener("click", () => beginSignIn(sso));
    if (!state.token && new URLSearchParams(location.search).get("login") === "sso") {
      await beginSignIn(sso); // a link that signs in at once: /dashboard?login=sso
      return;
    }
  }
  $("token").value = state.token ? "********" : "";
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (value && value !== "********") {
      state.token = value;
      localStorage.setItem(TOKEN_KEY, value);
      $("token").value = "********";
    }
    showWho();
    load();
  });
  $("forget-token").addEventListener("click", () => {
    localStorage.removeItem(TOKEN_KEY);
    state.token = "";
    $("token").value = "";
    showWho();
    load();
  });
  $("period").addEventListener("change", (event) => {
    state.period = event.target.value;
    writeHash();
    load();
  });
  $("refresh").addEventListener("click", () => load());
  window.addEventListener("hashchange", () => {
    const before = state.period;
    readHash();
    if (state.period !== before) load();
  });
  setInterval(() => {
    if (document.visibilityState === "visible") load();
  }, REFRESH_MS);
  showWho();
  await load();
  if (signInProblem) setStatus(signInProblem, true);
}

start();
