// lmforge dashboard: signs in with an admin key and shows what the admin API returns.
// Every string from the server goes into the page through text nodes (el()), never as HTML.
"use strict";

const KEY = "lmforge-admin-key";
let poll = null; // the timer of the view on screen (cleared when the view changes)

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options) {
  const opts = options || {};
  const response = await fetch(path, {
    ...opts,
    headers: { Authorization: `Bearer ${sessionStorage.getItem(KEY) || ""}`,
               "Content-Type": "application/json", ...(opts.headers || {}) },
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new ApiError(response.status, (body.error && body.error.message) || response.statusText);
  }
  return body;
}

function table(headers, rows, onClick) {
  return el("table", {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((row, i) => el("tr", onClick ? { class: "clickable", onclick: () => onClick(i) } : {},
      row.map((cell) => (cell instanceof Node ? el("td", {}, cell)
        : el("td", typeof cell === "number" ? { class: "n" } : {}, cell ?? "-")))))));
}

function bar(fraction) { // the CSP allows no style attributes; the CSSOM is fine
  const node = el("span", { class: "bar" });
  node.style.width = `${Math.round(fraction * 200)}px`;
  return node;
}

const fmt = (x) => (typeof x === "number" ? x.toLocaleString("en-US", { maximumSignificantDigits: 6 }) : x);

// -- charts (SVG, drawn here: no library) ---------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function lineChart(series, width = 720, height = 260) {
  const all = series.flatMap((s) => s.points);
  const chart = svg("svg", { class: "chart", width, height, "data-points": String(all.length) });
  if (!all.length) { chart.append(svg("text", { x: 20, y: 30 }, "no points yet")); return chart; }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs) || 1], [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const px = (x) => 50 + ((x - x0) / (x1 - x0 || 1)) * (width - 70);
  const py = (y) => height - 30 - ((y - y0) / (y1 - y0 || 1)) * (height - 50);
  chart.append(svg("text", { x: 4, y: 20 }, y1.toFixed(3)), svg("text", { x: 4, y: height - 30 }, y0.toFixed(3)),
               svg("text", { x: 50, y: height - 8 }, `step ${x0}`), svg("text", { x: width - 90, y: height - 8 }, `step ${x1}`));
  series.forEach((s, i) => {
    if (!s.points.length) return;
    const d = s.points.map((p) => `${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join(" ");
    chart.append(svg("polyline", { points: d, fill: "none", stroke: s.color, "stroke-width": 1.5 }),
                 svg("text", { x: width - 160, y: 20 + 16 * i, fill: s.color }, s.name));
  });
  return chart;
}

function barChart(rows, width = 720) {
  const height = 30 + rows.length * 22, max = Math.max(...rows.map((r) => r.value), 1e-12);
  const chart = svg("svg", { class: "chart", width, height });
  rows.forEach((r, i) => {
    const w = (r.value / max) * (width - 380);
    chart.append(svg("text", { x: 6, y: 24 + i * 22 }, r.label),
                 svg("rect", { x: 160, y: 12 + i * 22, width: Math.max(w, 1), height: 14, fill: "#4b6bfb" }),
                 svg("text", { x: 166 + w, y: 24 + i * 22 }, r.text));
  });
  return chart;
}

// -- views ----------------------------------------------------------------------------------------

const views = {
  async datasets(view) {
    const { data } = await api("/v1/admin/datasets");
    view.append(el("h2", {}, "Data sets"),
      table(["name", "tokenizer", "vocab", "documents", "tokens", "updated"],
        data.map((d) => [d.name, d.tokenizer, d.vocab_size, d.documents, d.tokens, d.updated_at])));
    for (const d of data) {
      view.append(el("h3", {}, `Funnel: ${d.name}`),
        table(["step", "documents", "characters", "kept"], d.funnel.map((f) => [f.step, f.documents, f.chars,
          el("span", {}, bar(f.kept), ` ${(f.kept * 100).toFixed(1)}%`)])));
    }
  },

  async runs(view) {
    const { data } = await api("/v1/admin/runs");
    const detail = el("div", { id: "run-detail" });
    view.append(el("h2", {}, "Training runs"),
      table(["run", "model", "stage", "status", "updated"], data.map((r) => [r.id, r.name, r.stage, r.status, r.updated_at]),
        (i) => watchRun(detail, data[i].id)), detail);
    if (data.length) watchRun(detail, data[0].id);
  },

  async models(view) {
    const { data } = await api("/v1/admin/models");
    const detail = el("div", { id: "model-detail" });
    view.append(el("h2", {}, "Models"),
      table(["name", "version", "arch", "params", "price in / out per M", "aliases", "parent"],
        data.map((m) => [m.name, m.version, m.arch, m.n_params, m.price ? `${m.price.input_per_million} / ${m.price.output_per_million}` : "free",
          m.aliases.join(", "), m.parent]), (i) => showModel(detail, data[i].name)), detail);
  },

  async keys(view) {
    const { data } = await api("/v1/admin/keys");
    const created = el("div", { id: "new-key" });
    const form = el("form", { class: "inline", id: "create-key" },
      el("label", {}, "name ", el("input", { name: "name", required: true, maxlength: 64 })),
      el("label", {}, "models ", el("input", { name: "models", placeholder: "all" })),
      el("label", {}, "rpm ", el("input", { name: "rpm", type: "number", min: 0 })),
      el("label", {}, "tpm ", el("input", { name: "tpm", type: "number", min: 0 })),
      el("label", {}, "budget $ ", el("input", { name: "budget", type: "number", min: 0, step: "any" })),
      el("label", {}, el("input", { name: "admin", type: "checkbox" }), " admin"),
      el("button", { type: "submit" }, "Create key"));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const f = new FormData(form), body = { name: f.get("name") };
      if (f.get("models")) body.models = f.get("models").split(",").map((s) => s.trim()).filter(Boolean);
      for (const k of ["rpm", "tpm"]) if (f.get(k)) body[k] = Number(f.get(k));
      if (f.get("budget")) body.budget = f.get("budget");
      if (f.get("admin")) body.admin = true;
      try {
        const key = await api("/v1/admin/keys", { method: "POST", body: JSON.stringify(body) });
        await show("keys");
        document.getElementById("new-key").replaceChildren(
          el("p", {}, `Key ${key.name} created. Copy it now: it is not shown again.`), el("div", { class: "secret" }, key.key));
      } catch (err) { created.replaceChildren(el("p", { class: "error" }, err.message)); }
    });
    view.append(el("h2", {}, "API keys"), form, created,
      table(["name", "key", "status", "admin", "models", "rpm", "tpm", "budget", "spent", ""],
        data.map((k) => [k.name, k.key, k.status, k.admin ? "yes" : "", (k.models || ["all"]).join(", "), k.rpm, k.tpm,
          k.budget ? `${k.budget} (${k.budget_period})` : "", k.spent,
          k.status === "active" ? el("span", {},
            el("button", { class: "edit", onclick: () => editLimits(created, k) }, "Limits"), " ",
            el("button", { class: "revoke", onclick: async () => { await api(`/v1/admin/keys/${encodeURIComponent(k.name)}`, { method: "DELETE" }); show("keys"); } }, "Revoke")) : ""])));
  },

  async usage(view) {
    const by = el("select", { id: "group-by" }, ["day", "key", "model"].map((g) => el("option", { value: g }, g)));
    const out = el("div", { id: "usage-out" });
    const period = el("input", { id: "period", value: new Date().toISOString().slice(0, 7), size: 8 });
    const invoiceOut = el("div", { id: "invoice-out" });
    async function load() {
      const { data } = await api(`/v1/admin/usage?group_by=${by.value}`);
      out.replaceChildren(
        barChart(data.map((g) => ({ label: g.group || "(none)", value: g.prompt_tokens + g.completion_tokens,
          text: `${(g.prompt_tokens + g.completion_tokens).toLocaleString()} tokens · ${g.cost}` }))),
        table([by.value, "requests", "ok", "prompt tokens", "completion tokens", "cost"],
          data.map((g) => [g.group, g.requests, g.ok, g.prompt_tokens, g.completion_tokens, g.cost])));
    }
    async function invoice() {
      try {
        const inv = await api(`/v1/admin/invoices/${encodeURIComponent(period.value)}`);
        invoiceOut.replaceChildren(el("h3", {}, `Invoice ${inv.invoice}: $${inv.total}`),
          table(["key", "model", "requests", "prompt tokens", "completion tokens", "amount"],
            inv.lines.map((l) => [l.key, l.model, l.requests, l.prompt_tokens, l.completion_tokens, `$${l.amount}`])));
      } catch (err) { invoiceOut.replaceChildren(el("p", { class: "error" }, err.message)); }
    }
    by.addEventListener("change", load);
    view.append(el("h2", {}, "Usage"), el("label", {}, "group by ", by), out,
      el("h2", {}, "Billing"), el("form", { class: "inline", onsubmit: (e) => { e.preventDefault(); invoice(); } },
        el("label", {}, "period ", period), el("button", { type: "submit" }, "Invoice")), invoiceOut);
    await load();
    await invoice();
    poll = setInterval(load, 3000);
  },

  async audit(view) {
    const { data } = await api("/v1/admin/audit?limit=200");
    view.append(el("h2", {}, "Audit log"),
      table(["at", "actor", "action", "target", "details"], data.map((a) => [a.at, a.actor, a.action, a.target, JSON.stringify(a.details)])));
  },

  async playground(view) {
    const { data } = await api("/v1/models");
    const model = el("select", { id: "pg-model" }, data.map((m) => el("option", { value: m.id }, m.id)));
    const mode = el("select", { id: "pg-mode" }, el("option", { value: "chat" }, "chat"), el("option", { value: "completion" }, "completion"));
    const prompt = el("textarea", { id: "pg-prompt", placeholder: "Say something…" });
    const maxTokens = el("input", { id: "pg-max", type: "number", min: 1, value: 64, size: 5 });
    const log = el("div", { id: "pg-log" });
    const status = el("p", { id: "pg-status", class: "muted" });
    const history = [];
    const form = el("form", {}, el("p", {}, el("label", {}, "model ", model), " ", el("label", {}, "mode ", mode),
      " ", el("label", {}, "max tokens ", maxTokens)),
      prompt, el("button", { type: "submit", id: "pg-send" }, "Send"));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const text = prompt.value;
      if (!text) return;
      prompt.value = "";
      log.append(el("div", { class: "bubble user" }, text));
      const answer = el("div", { class: "bubble assistant" });
      log.append(answer);
      const chat = mode.value === "chat";
      if (chat) history.push({ role: "user", content: text });
      const limit = Number(maxTokens.value) || 64;
      const body = chat ? { model: model.value, messages: history, stream: true, max_tokens: limit }
        : { model: model.value, prompt: text, stream: true, max_tokens: limit };
      body.stream_options = { include_usage: true };
      status.textContent = "streaming…";
      try {
        const reply = await stream(chat ? "/v1/chat/completions" : "/v1/completions", body, answer, chat);
        if (chat) history.push({ role: "assistant", content: reply.text });
        status.textContent = reply.usage ? `${reply.usage.prompt_tokens} prompt + ${reply.usage.completion_tokens} completion tokens` : "done";
      } catch (err) {
        answer.classList.add("error");
        answer.textContent = err.message;
        status.textContent = "failed";
      }
    });
    view.append(el("h2", {}, "Playground"), form, status, log);
  },
};

function editLimits(holder, key) {
  // Empty fields remove a limit (null), as `lmforge keys update --rpm none` does.
  const field = (name, value, step) => el("label", {}, `${name} `,
    el("input", { name, type: "number", min: 0, step: step || 1, value: value ?? "" }));
  const form = el("form", { class: "inline", id: "edit-key" }, el("strong", {}, key.name),
    field("rpm", key.rpm), field("tpm", key.tpm),
    field("budget", key.budget ? key.budget.replace("$", "") : null, "any"),
    el("button", { type: "submit" }, "Save limits"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const f = new FormData(form);
    const body = { rpm: f.get("rpm") === "" ? null : Number(f.get("rpm")),
                   tpm: f.get("tpm") === "" ? null : Number(f.get("tpm")),
                   budget: f.get("budget") === "" ? null : f.get("budget") };
    try {
      await api(`/v1/admin/keys/${encodeURIComponent(key.name)}`, { method: "PATCH", body: JSON.stringify(body) });
      await show("keys");
    } catch (err) { holder.replaceChildren(form, el("p", { class: "error" }, err.message)); }
  });
  holder.replaceChildren(form);
}

async function stream(path, body, into, chat) {
  const response = await fetch(path, {
    method: "POST", body: JSON.stringify(body),
    headers: { Authorization: `Bearer ${sessionStorage.getItem(KEY)}`, "Content-Type": "application/json" },
  });
  if (!response.ok) {
    const err = await response.json().catch(() => ({}));
    throw new ApiError(response.status, (err.error && err.error.message) || response.statusText);
  }
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "", text = "", usage = null, pieces = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const chunk = JSON.parse(line.slice(6));
      if (chunk.error) throw new ApiError(500, chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      const piece = choice ? (chat ? (choice.delta && choice.delta.content) || "" : choice.text || "") : "";
      if (piece) { text += piece; pieces += 1; into.textContent = text; into.dataset.pieces = String(pieces); }
    }
  }
  return { text, usage };
}

async function watchRun(detail, runId) {
  clearInterval(poll);
  const loss = [], val = [];
  let last = 0;
  const holder = el("div", { id: "run-chart" });
  const status = el("p", { id: "run-status", class: "muted" });
  detail.replaceChildren(el("h3", {}, `Loss: ${runId}`), holder, status);
  async function update() {
    const got = await api(`/v1/admin/runs/${encodeURIComponent(runId)}/metrics?after=${last}`);
    for (const row of got.data) {
      if (typeof row.loss === "number") loss.push([row.step, row.loss]);
      if (typeof row.val_loss === "number") val.push([row.step, row.val_loss]);
      last = Math.max(last, row.step);
    }
    holder.replaceChildren(lineChart([{ name: "train loss", points: loss, color: "#4b6bfb" },
                                      { name: "val loss", points: val, color: "#e8590c" }]));
    status.textContent = `${got.status} · step ${last}` + (loss.length ? ` · loss ${loss[loss.length - 1][1].toFixed(4)}` : "");
    if (got.status !== "running") clearInterval(poll);
  }
  await update();
  poll = setInterval(() => update().catch(() => clearInterval(poll)), 1500);
}

async function showModel(detail, name) {
  const m = await api(`/v1/admin/models/${encodeURIComponent(name)}`);
  const tree = (node) => el("li", {}, el("span", { class: "kind" }, node.kind), " ", node.label,
    node.missing ? el("span", { class: "error" }, ` (missing: ${node.missing})`) : null,
    Object.entries(node.details || {}).map(([k, v]) => el("div", { class: "muted" }, `${k}: ${v}`)),
    node.children && node.children.length ? el("ul", { class: "tree" }, node.children.map(tree)) : null);
  detail.replaceChildren(el("h3", {}, `${m.name}: versions`),
    table(["version", "sha256", "parent", "created"], m.versions.map((v) => [v.version, v.sha256.slice(0, 16), v.parent, v.created_at])),
    el("h3", {}, "Evaluation results"),
    table(["model", "task", "data", "metrics", "contamination", "when"], m.evals.map((e) => [e.model, e.task, e.data,
      Object.entries(e.metrics).map(([k, v]) => `${k} ${fmt(v)}`).join(", "),
      e.contamination_rate === null ? "-" : `${(e.contamination_rate * 100).toFixed(1)}%`, e.created_at])),
    el("h3", {}, "Price and aliases"),
    el("p", {}, m.price ? `${m.price.input_per_million} in / ${m.price.output_per_million} out per million tokens` : "no price (free)"),
    el("p", {}, m.aliases.length ? m.aliases.map((a) => `${a.name} → ${a.target}`).join(", ") : "no alias"),
    el("h3", {}, "Lineage"), el("ul", { class: "tree", id: "lineage" }, tree(m.lineage)),
    el("h3", {}, "Model card"), el("pre", { id: "card" }, m.card || "(none)"));
}

async function show(tab) {
  clearInterval(poll);
  for (const b of document.querySelectorAll("#nav button[data-tab]")) b.classList.toggle("active", b.dataset.tab === tab);
  const view = el("div", { id: `view-${tab}` });
  document.getElementById("view").replaceChildren(view);
  try {
    await views[tab](view);
  } catch (err) {
    if (err.status === 401 || err.status === 403) return signOut(err.message);
    view.append(el("p", { class: "error" }, err.message));
  }
}

function signOut(message) {
  clearInterval(poll);
  sessionStorage.removeItem(KEY);
  document.getElementById("view").replaceChildren();
  document.getElementById("nav").hidden = true;
  document.getElementById("sign-in").hidden = false;
  document.getElementById("sign-in-error").textContent = message || "";
}

async function signIn(key) {
  sessionStorage.setItem(KEY, key);
  try {
    await api("/v1/admin/keys"); // admin keys only: anything else is refused here
  } catch (err) {
    return signOut(err.status === 401 || err.status === 403 ? `cannot sign in: ${err.message}` : err.message);
  }
  document.getElementById("sign-in").hidden = true;
  document.getElementById("nav").hidden = false;
  show("datasets");
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("sign-in").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn(document.getElementById("admin-key").value.trim());
  });
  for (const b of document.querySelectorAll("#nav button[data-tab]")) b.addEventListener("click", () => show(b.dataset.tab));
  document.getElementById("sign-out").addEventListener("click", () => signOut(""));
  const key = sessionStorage.getItem(KEY);
  if (key) signIn(key); else signOut("");
});
