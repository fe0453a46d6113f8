// The saga explorer: a page over the orchestrator's /api (see
// orchestrator/src/explorer). No framework and no build step: it is built
// into the binary as it is. Every value from the server goes into the page as
// text (textContent), never as markup: an order's fields are client input.
"use strict";

const KEY_STORAGE = "saga-explorer-key";
const LIST_REFRESH_MS = 3000;
const PAGE_SIZE = 25;

const state = {
  scope: null, // "read" or "admin", once signed in
  jaeger: "",
  pageTokens: [""], // the tokens of the pages seen, for "next"
  listTimer: null,
  live: null, // AbortController of the saga page's live stream
  order: null, // the saga page's order
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// ---- the API --------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.code = body && body.code;
  }
}

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { "x-api-key": key, ...extra } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: headers(options.body ? { "content-type": "application/json" } : {}),
  });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new ApiError(response.status, body);
    if (response.status === 401) showLogin(error.message);
    throw error;
  }
  return body;
}

function post(path, payload) {
  return api(path, { method: "POST", body: JSON.stringify(payload) });
}

// ---- formatting ------------------------------------------------------------

const shortStatus = (s) => (s || "").replace(/^ORDER_STATUS_|^STEP_STATUS_|^STEP_PHASE_/, "");
const ms = (t) => (t ? Date.parse(t) : null);

function when(t) {
  if (!t) return "";
  const d = new Date(t);
  return d.toLocaleString(undefined, { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function duration(millis) {
  if (millis === null || millis === undefined || Number.isNaN(millis)) return "";
  if (millis < 1000) return `${Math.round(millis)} ms`;
  if (millis < 120000) return `${(millis / 1000).toFixed(1)} s`;
  return `${Math.round(millis / 60000)} min`;
}

function money(cents, currency) {
  const n = Number(cents || 0) / 100;
  return `${n.toFixed(2)} ${currency || ""}`.trim();
}

function statusBadge(status) {
  const s = shortStatus(status);
  return el("span", { class: `status status-${s.toLowerCase()}`, text: s });
}

function requestId() {
  return `explorer-${crypto.randomUUID()}`;
}

function showError(error) {
  $("error").textContent = error ? String(error.message || error) : "";
}

// ---- views -----------------------------------------------------------------

function show(view) {
  for (const id of ["login", "list", "attention", "saga"]) $(id).hidden = id !== view;
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("current", link.dataset.nav === view);
  }
  if (view !== "list") clearInterval(state.listTimer);
  if (view !== "saga" && state.live) {
    state.live.abort();
    state.live = null;
  }
}

function showLogin(message) {
  state.scope = null;
  show("login");
  $("login-error").textContent = message || "";
  $("scope").textContent = "";
  $("sign-out").hidden = true;
}

async function signIn() {
  try {
    const session = await api("/api/session");
    state.scope = session.scope;
    state.jaeger = session.jaegerUrl || "";
    $("scope").textContent = session.scope === "admin" ? "admin: read and act" : "read only";
    $("sign-out").hidden = !sessionStorage.getItem(KEY_STORAGE);
    return true;
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) showLogin(error.message);
    return false;
  }
}

// The list: counts per status, the filters, one page of orders.

function listQuery() {
  const query = new URLSearchParams();
  const status = $("filter-status").value;
  if (status) query.append("status", status);
  const customer = $("filter-customer").value.trim();
  if (customer) query.set("customer_id", customer);
  const from = $("filter-from").value;
  if (from) query.set("created_after", new Date(from).toISOString());
  const to = $("filter-to").value;
  if (to) query.set("created_before", new Date(to).toISOString());
  query.set("page_size", PAGE_SIZE);
  return query;
}

async function loadCounts() {
  const { counts } = await api("/api/counts");
  const box = $("counts");
  box.replaceChildren();
  let total = 0;
  for (const [status, count] of Object.entries(counts)) {
    total += count;
    box.append(
      el("button", {
        type: "button",
        class: `count status-${status.toLowerCase()}`,
        "data-status": status,
        onclick: () => {
          $("filter-status").value = status;
          state.pageTokens = [""];
          loadOrders().catch(showError);
        },
      }, el("span", { class: "count-n", text: count }), " ", status),
    );
  }
  box.prepend(el("span", { class: "count total" }, el("span", { class: "count-n", text: total }), " orders"));
  $("attention-count").textContent = counts.NEEDS_ATTENTION ? counts.NEEDS_ATTENTION : "";
}

async function loadOrders() {
  const query = listQuery();
  const token = state.pageTokens[state.pageTokens.length - 1];
  if (token) query.set("page_token", token);
  const page = await api(`/api/orders?${query}`);
  const body = $("orders-body");
  body.replaceChildren();
  for (const order of page.orders || []) {
    body.append(
      el("tr", { "data-order": order.orderId, "data-status": shortStatus(order.status) },
        el("td", { text: when(order.createdAt) }),
        el("td", {}, el("a", { href: `#/orders/${order.orderId}`, text: order.orderId })),
        el("td", { text: order.customerId || "" }),
        el("td", { text: money(order.totalCents, order.currency) }),
        el("td", {}, statusBadge(order.status)),
        el("td", { class: "reason", text: order.failureReason || "" }),
      ),
    );
  }
  if (!(page.orders || []).length) body.append(el("tr", {}, el("td", { colspan: 6, text: "No orders match." })));
  // Which filter the rows shown answer (a click's page replaces the last one's).
  body.dataset.shownStatus = query.get("status") || "";
  $("next-page").disabled = !page.nextPageToken;
  $("next-page").dataset.token = page.nextPageToken || "";
  $("first-page").disabled = state.pageTokens.length === 1;
}

// Each view is fetched before it shows, so it never shows stale data.
async function showList() {
  await Promise.all([loadCounts(), loadOrders()]);
  show("list");
  clearInterval(state.listTimer);
  // Live counts; the first page follows new orders, a later page stays put.
  state.listTimer = setInterval(() => {
    loadCounts().catch(showError);
    if (state.pageTokens.length === 1) loadOrders().catch(showError);
  }, LIST_REFRESH_MS);
}

// Attention: the sagas that wait for a person.

function failedCompensation(order) {
  const steps = (order.steps || []).filter((s) => shortStatus(s.phase) === "COMPENSATION");
  return steps.find((s) => shortStatus(s.status) !== "SUCCEEDED") || steps[steps.length - 1] || {};
}

async function showAttention() {
  const page = await api("/api/orders?status=NEEDS_ATTENTION&page_size=200");
  show("attention");
  const body = $("attention-body");
  body.replaceChildren();
  for (const order of page.orders || []) {
    const step = failedCompensation(order);
    body.append(
      el("tr", { "data-order": order.orderId },
        el("td", { text: when(order.updatedAt) }),
        el("td", {}, el("a", { href: `#/orders/${order.orderId}`, text: order.orderId })),
        el("td", { text: order.customerId || "" }),
        el("td", { text: step.name ? `undo ${step.name} (${step.attempts || 0} attempts)` : "" }),
        el("td", { class: "reason", text: step.lastError || order.failureReason || "" }),
        el("td", {}, ...actionButtons(order, { pivotPassed: true })),
      ),
    );
  }
  if (!(page.orders || []).length) body.append(el("tr", {}, el("td", { colspan: 6, text: "Nothing needs a person." })));
  const all = $("retry-all");
  const count = (page.orders || []).length;
  all.textContent = `Retry all (${count}${page.nextPageToken ? "+" : ""})`;
  all.disabled = state.scope !== "admin" || count === 0;
  all.title = state.scope === "admin" ? "" : "Actions take the admin key";
}

// Retry in bulk: every saga that needs attention now, after a count and a
// confirmation; one request each, with the batch's request IDs
// (`<batch>:<order>`), and progress as they go.
async function retryAll() {
  const orders = [];
  let token = "";
  do {
    const page = await api(`/api/orders?status=NEEDS_ATTENTION&page_size=500${token ? `&page_token=${encodeURIComponent(token)}` : ""}`);
    orders.push(...(page.orders || []));
    token = page.nextPageToken || "";
  } while (token);
  if (!orders.length || !confirm(`Retry the failed compensation of ${orders.length} saga(s) now?`)) return;
  const batch = `explorer-${crypto.randomUUID()}`;
  const progress = $("bulk-progress");
  const tally = { done: 0, skipped: 0, failed: 0 };
  const show = () => {
    progress.textContent = `${tally.done + tally.skipped + tally.failed} of ${orders.length}: ` +
      `${tally.done} retried, ${tally.skipped} skipped, ${tally.failed} failed`;
  };
  show();
  for (const order of orders) {
    try {
      await post(`/api/orders/${order.orderId}/retry`, { request_id: `${batch}:${order.orderId}` });
      tally.done++;
    } catch (error) {
      if (error.code === "FAILED_PRECONDITION") tally.skipped++;
      else tally.failed++;
    }
    show();
  }
  await showAttention();
}

// The saga page: facts, actions, timeline, steps, history; live.

function actionButtons(order, saga) {
  const status = shortStatus(order.status);
  const admin = state.scope === "admin";
  const why = admin ? undefined : "Actions take the admin key";
  const buttons = [];
  if (status === "NEEDS_ATTENTION") {
    buttons.push(
      el("button", { type: "button", class: "act", "data-action": "retry", disabled: !admin, title: why,
        onclick: () => act(order.orderId, "retry", {}) }, "Retry now"),
      el("button", { type: "button", class: "act", "data-action": "resolve", disabled: !admin, title: why,
        onclick: () => resolve(order.orderId) }, "Resolve by hand"),
    );
  }
  if (status === "RUNNING" && !saga.pivotPassed && !saga.cancelRequested) {
    buttons.push(
      el("button", { type: "button", class: "act", "data-action": "cancel", disabled: !admin, title: why,
        onclick: () => act(order.orderId, "cancel", { reason: "cancelled in the saga explorer" }) }, "Cancel"),
    );
  }
  return buttons;
}

async function act(orderId, action, payload) {
  $("action-result").textContent = "";
  try {
    await post(`/api/orders/${orderId}/${action}`, { request_id: requestId(), ...payload });
    $("action-result").textContent = `${action}: done`;
    route();
  } catch (error) {
    $("action-result").textContent = `${action} refused: ${error.message}`;
  }
}

function resolve(orderId) {
  const dialog = $("resolve-dialog");
  $("resolve-form").onsubmit = (event) => {
    if (event.submitter && event.submitter.value !== "ok") return;
    act(orderId, "resolve", {
      operator: $("resolve-operator").value,
      reason: $("resolve-reason").value,
    });
  };
  dialog.showModal();
}

function renderFacts(order, detail) {
  $("saga-id").textContent = order.orderId;
  $("saga-status").replaceChildren(statusBadge(order.status));
  $("saga-customer").textContent = order.customerId || "";
  $("saga-total").textContent = money(order.totalCents, order.currency);
  $("saga-created").textContent = when(order.createdAt);
  $("saga-updated").textContent = when(order.updatedAt);
  $("saga-request").textContent = order.requestId || "";
  $("saga-reason").textContent = order.failureReason || "–";
  const trace = $("saga-trace");
  trace.replaceChildren();
  if (detail.traceUrl) {
    trace.append(el("a", { href: detail.traceUrl, target: "_blank", rel: "noopener", text: order.traceId }));
  } else {
    trace.textContent = order.traceId || "–";
  }
  $("actions").replaceChildren(...actionButtons(order, detail.saga));
}

// One row per step run, forward then compensations in the order they ran,
// each a bar on the saga's time axis; markers for the pivot, the cancel,
// operator actions and the events the saga emitted.
function renderTimeline(order, saga) {
  const box = $("timeline");
  box.replaceChildren();
  const steps = order.steps || [];
  // Only a saga being driven grows; one that rests (NEEDS_ATTENTION) does not.
  const open = ["RUNNING", "COMPENSATING"].includes(shortStatus(order.status));
  const start = ms(order.createdAt);
  const times = [ms(order.updatedAt)];
  for (const step of steps) times.push(ms(step.startedAt), ms(step.finishedAt));
  for (const e of saga.events || []) times.push(ms(e.createdAt));
  for (const a of saga.actions || []) times.push(ms(a.at));
  for (const a of saga.attempts || []) times.push(ms(a.finishedAt));
  let end = Math.max(start + 1, ...times.filter((t) => t !== null));
  if (open) end = Math.max(end, Date.now());
  const span = end - start;
  const at = (t) => `${Math.min(100, Math.max(0, ((t - start) / span) * 100))}%`;

  const axis = el("div", { class: "axis" });
  for (let i = 0; i <= 4; i++) {
    const tick = el("span", { class: "tick", text: duration((span * i) / 4) });
    tick.style.left = `${i * 25}%`;
    axis.append(tick);
  }
  box.append(el("div", { class: "row axis-row" }, el("div", { class: "label" }), axis));

  steps.forEach((step, i) => {
    const phase = shortStatus(step.phase).toLowerCase();
    const status = shortStatus(step.status).toLowerCase();
    const track = el("div", { class: "track" });
    const began = ms(step.startedAt);
    const tries = (saga.attempts || []).filter((a) => a.step === step.name && a.phase === phase);
    if (began !== null) {
      const ended = ms(step.finishedAt) ?? (open ? Date.now() : ms(order.updatedAt));
      const bar = el("div", {
        class: `bar ${phase} step-${status}${tries.length ? " retried" : ""}`,
        title: `${step.name} ${phase}: ${status}, ${step.attempts || 0} attempt(s), ${duration(ended - began)}` +
          (step.lastError ? `\nlast error: ${step.lastError}` : ""),
      }, step.attempts > 1 && !tries.length ? `×${step.attempts}` : "");
      bar.style.left = at(began);
      bar.style.width = `max(3px, calc(${at(ended)} - ${at(began)}))`;
      track.append(bar);
    }
    // A retried step: each attempt as a bar of its own, over the step's.
    for (const attempt of tries) {
      const from = ms(attempt.startedAt);
      const to = ms(attempt.finishedAt);
      const bar = el("div", {
        class: `attempt ${attempt.error ? "failed" : "settled"}`,
        "data-attempt": attempt.attempt,
        title: `attempt ${attempt.attempt}: ${duration(to - from)}` + (attempt.error ? `\n${attempt.error}` : ", settled the step"),
      });
      bar.style.left = at(from);
      bar.style.width = `max(3px, calc(${at(to)} - ${at(from)}))`;
      track.append(bar);
    }
    const pivot = phase === "forward" && step.name === saga.pivotStep;
    if (pivot && began !== null) {
      const line = el("div", { class: "marker pivot", title: "pivot: from here on the order can no longer be cancelled" });
      line.style.left = at(began);
      track.append(line);
    }
    box.append(
      el("div", {
        class: `row step-row ${phase}`,
        "data-step": step.name,
        "data-phase": phase,
        "data-status": status,
        "data-index": i,
      },
      el("div", { class: "label" },
        el("span", { class: "arrow", text: phase === "forward" ? "→" : "↩" }), " ",
        step.name,
        pivot ? el("span", { class: "pill pivot-pill", text: "pivot" }) : null,
        el("span", { class: `pill step-${status}`, text: status }),
        step.attempts > 1 ? el("span", { class: "pill retries", text: `${step.attempts} attempts` }) : null,
        step.lastError ? el("div", { class: "error-line", text: step.lastError }) : null,
      ),
      track),
    );
  });

  const marks = el("div", { class: "track" });
  for (const e of saga.events || []) {
    const dot = el("div", { class: "marker event", title: `${e.eventType} (#${e.sequence})${e.sentAt ? ", sent" : ", not sent yet"}` });
    dot.style.left = at(ms(e.createdAt));
    marks.append(dot);
  }
  for (const a of saga.actions || []) {
    const flag = el("div", { class: "marker action", title: `${a.action}: ${a.note}` });
    flag.style.left = at(ms(a.at));
    marks.append(flag);
  }
  box.append(el("div", { class: "row marks-row" },
    el("div", { class: "label", text: saga.cancelRequested ? "events · cancel requested" : "events and actions" }),
    marks));
}

function renderSteps(order) {
  const body = $("steps-body");
  body.replaceChildren();
  (order.steps || []).forEach((step, i) => {
    const began = ms(step.startedAt);
    const ended = ms(step.finishedAt);
    body.append(el("tr", { "data-step": step.name, "data-phase": shortStatus(step.phase).toLowerCase() },
      el("td", { text: i + 1 }),
      el("td", { text: step.name }),
      el("td", { text: shortStatus(step.phase).toLowerCase() }),
      el("td", {}, statusBadge(step.status)),
      el("td", { text: step.attempts || 0 }),
      el("td", { text: when(step.startedAt) }),
      el("td", { text: began !== null && ended !== null ? duration(ended - began) : "" }),
      el("td", { class: step.lastError ? "reason" : "", text: step.lastError || step.result || "" }),
    ));
  });
}

function renderHistory(order, saga) {
  const rows = [];
  rows.push({ at: order.createdAt, what: "order recorded", detail: `request ${order.requestId || ""}` });
  for (const e of saga.events || []) {
    rows.push({ at: e.createdAt, what: e.eventType, detail: `event #${e.sequence}${e.sentAt ? `, sent ${when(e.sentAt)}` : ", not sent yet"}` });
  }
  for (const a of saga.actions || []) {
    rows.push({ at: a.at, what: a.action, detail: a.note, cls: "action" });
  }
  if (saga.cancelRequested) rows.push({ at: null, what: "cancel requested", detail: "by the client, before the pivot" });
  rows.sort((a, b) => (ms(a.at) ?? Infinity) - (ms(b.at) ?? Infinity));
  $("history-body").replaceChildren(...rows.map((r) =>
    el("tr", { class: r.cls || "" }, el("td", { text: when(r.at) }), el("td", { text: r.what }), el("td", { text: r.detail }))));
}

function renderSaga(detail) {
  state.order = detail.order;
  renderFacts(detail.order, detail);
  renderTimeline(detail.order, detail.saga);
  renderSteps(detail.order);
  renderHistory(detail.order, detail.saga);
}

// Follows the order through /live (server-sent events, read with fetch so
// that the key travels in a header), until it is terminal or the page leaves.
async function follow(orderId) {
  const controller = new AbortController();
  state.live = controller;
  const live = $("saga-live");
  live.textContent = "live";
  live.className = "live on";
  try {
    const response = await fetch(`/api/orders/${orderId}/live`, { headers: headers(), signal: controller.signal });
    if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n");
        if (!data) continue;
        const message = JSON.parse(data);
        if (message.error) throw new Error(message.error.message);
        renderSaga(message);
      }
    }
    live.textContent = "final";
    live.className = "live";
  } catch (error) {
    if (controller.signal.aborted) return;
    live.textContent = `live view stopped: ${error.message}`;
    live.className = "live off";
  }
}

async function showSaga(orderId) {
  if (state.live) {
    state.live.abort();
    state.live = null;
  }
  const detail = await api(`/api/orders/${orderId}`);
  $("action-result").textContent = "";
  renderSaga(detail);
  show("saga");
  const status = shortStatus(detail.order.status);
  if (["RUNNING", "COMPENSATING"].includes(status)) follow(orderId);
  else $("saga-live").textContent = "";
}

// ---- routing ----------------------------------------------------------------

async function route() {
  showError(null);
  if (!state.scope && !(await signIn())) return;
  const hash = location.hash || "#/";
  try {
    const saga = hash.match(/^#\/orders\/([0-9a-fA-F-]{36})$/);
    if (saga) await showSaga(saga[1]);
    else if (hash === "#/attention") await showAttention();
    else await showList();
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) showError(error);
  }
}

function boot() {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("login-key").value.trim());
    $("login-key").value = "";
    if (await signIn()) route();
  });
  $("sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    showLogin("Signed out.");
  });
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    state.pageTokens = [""];
    loadOrders().catch(showError);
  });
  $("next-page").addEventListener("click", () => {
    state.pageTokens.push($("next-page").dataset.token);
    loadOrders().catch(showError);
  });
  $("retry-all").addEventListener("click", () => retryAll().catch(showError));
  $("first-page").addEventListener("click", () => {
    state.pageTokens = [""];
    loadOrders().catch(showError);
  });
  window.addEventListener("hashchange", route);
  route();
}

document.addEventListener("DOMContentLoaded", boot);
