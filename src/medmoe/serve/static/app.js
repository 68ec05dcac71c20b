// The medmoe page: POST /v1/answer and show the answer, the expert and why (for the routed system: p_M,
// the threshold tau, the decision and the gate's top features; a threshold of the user's own on request),
// latency and a history.
// Plain JS, no dependencies; text is always inserted with textContent (never as HTML).
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];
const HISTORY_SIZE = 10;
const FEATURES = {  // the gate's features (docs/router.md), in words
  complexity: "tokens unlike their neighbours", rarity: "rare tokens", fragmentation: "words split into pieces",
  domain: "medical terms", length: "query length", log_length: "query length, log scale",
};
const SOURCES = { calibrated: "calibrated", model: "set by the model name", request: "set for this question", latency_budget: "for a latency budget" };
let routedServer = null;  // the routed system's /v1/models entry (its calibrated tau), or null for a single model

function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

function item(tag, text, className) {
  const node = document.createElement(tag);
  node.textContent = text;
  if (className) node.className = className;
  return node;
}

function describeLatency(ms) {
  const parts = [`${Math.round(ms.total)} ms total`];
  for (const [stage, value] of Object.entries(ms)) {
    if (stage !== "total") parts.push(`${stage} ${Math.round(value)} ms`);
  }
  return parts.join(" · ");
}

function expertName(expert) {
  return expert === "mamba" ? "the Mamba expert" : expert === "transformer" ? "the Transformer expert" : expert;
}

function describeTau(routing) {
  const budget = routing.source === "latency_budget" ? ` of ${Math.round(routing.latency_budget_ms)} ms` : "";
  return `${routing.tau.toFixed(3)} (${SOURCES[routing.source] || routing.source}${budget})`;
}

function showRouting(data) {
  // A routed answer (the gate decided): p_M, the threshold, the decision and the features that decided it.
  // A single model's answer shows none of these: it made no routing decision.
  const routed = data.gate_probability !== null && data.gate_probability !== undefined;
  for (const node of document.querySelectorAll(".routed")) node.hidden = !routed;
  if (!routed) return;
  const p = data.gate_probability;
  $("gate").textContent = p.toFixed(3);
  $("tau-row").hidden = !data.routing;
  $("decision-row").hidden = !data.routing;
  if (data.routing) {
    const tau = data.routing.tau;
    $("tau-used").textContent = describeTau(data.routing);
    const decision = $("decision");
    const toMamba = data.expert === "mamba" || (data.expert !== "transformer" && p > tau);  // the server's decision
    decision.textContent = `p_M ${p.toFixed(3)} ${toMamba ? ">" : "≤"} τ ${tau.toFixed(3)}: ${expertName(toMamba ? "mamba" : "transformer")}`;
    decision.className = toMamba ? "decision-mamba" : "decision-transformer";
  }
  const features = $("features");
  clear(features);
  for (const f of data.top_features) {
    const li = document.createElement("li");
    li.appendChild(item("span", FEATURES[f.name] ? `${f.name} (${FEATURES[f.name]}): ` : `${f.name}: `, "name"));
    li.appendChild(item("span", `${f.contribution >= 0 ? "+" : ""}${f.contribution.toFixed(3)}`, "value"));
    li.appendChild(item("span", f.contribution >= 0 ? " toward Mamba" : " toward Transformer", "toward"));
    features.appendChild(li);
  }
}

function showResult(request, data) {
  const answer = data.answer_text ? `${data.answer}. ${data.answer_text}` : (data.answer || "(empty answer)");
  $("answer").textContent = answer;
  $("expert").textContent = data.expert;
  $("latency").textContent = describeLatency(data.latency_ms) + ` · batch of ${data.batch_size}` +
    (data.truncated_context_tokens ? ` · context cut by ${data.truncated_context_tokens} tokens` : "");
  showRouting(data);

  const body = $("scores").tBodies[0];
  clear(body);
  const letters = Object.keys(data.label_scores);
  $("scores-box").hidden = letters.length === 0;
  for (const letter of letters) {
    const p = data.label_scores[letter];
    const row = document.createElement("tr");
    const text = request.options ? request.options[letter.charCodeAt(0) - 65] : "";
    row.appendChild(item("td", text ? `${letter}. ${text}` : letter));
    const cell = document.createElement("td");
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.round(p * 8)}rem`;
    bar.setAttribute("aria-hidden", "true");
    cell.appendChild(bar);
    cell.appendChild(document.createTextNode(p.toFixed(3)));
    row.appendChild(cell);
    body.appendChild(row);
  }
  $("result").hidden = false;
}

function addHistory(request, data) {
  history.unshift({ question: request.question, answer: data.answer_text ? `${data.answer}. ${data.answer_text}` : data.answer,
                    expert: data.expert, ms: data.latency_ms.total, tau: data.routing ? data.routing.tau : null });
  history.length = Math.min(history.length, HISTORY_SIZE);
  try { sessionStorage.setItem("medmoe-history", JSON.stringify(history)); } catch (e) { /* private mode */ }
  renderHistory();
}

function renderHistory() {
  const list = $("history");
  clear(list);
  $("history-empty").hidden = history.length > 0;
  for (const h of history) {
    const li = document.createElement("li");
    li.appendChild(item("div", h.question));
    const tau = typeof h.tau === "number" ? `, τ ${h.tau.toFixed(2)}` : "";
    li.appendChild(item("div", `→ ${h.answer} (${h.expert}${tau}, ${Math.round(h.ms)} ms)`, "meta"));
    list.appendChild(li);
  }
}

function readRequest() {
  const request = { question: $("question").value.trim() };
  const context = $("context").value.trim();
  const options = $("options").value.split("\n").map((s) => s.trim()).filter(Boolean);
  if (context) request.context = context;
  if (options.length) request.options = options;
  if (routedServer && $("tau-override").checked) request.routing = { tau: Number($("tau").value) };
  return request;
}

async function loadRouting() {
  // A routed server lists `mambaformer` first with its calibrated tau: offer a threshold for the question.
  try {
    const response = await fetch("/v1/models");
    const models = await response.json();
    const first = models.data && models.data[0];
    if (!first || !first.medmoe || typeof first.medmoe.tau !== "number") return;
    routedServer = first.medmoe;
  } catch (e) { return; /* the page works without it */ }
  const tau = Math.min(Math.max(routedServer.tau, 0), 1);
  $("tau").value = String(tau);
  $("tau-value").textContent = Number($("tau").value).toFixed(2);
  $("tau-default").textContent = `(otherwise the calibrated τ = ${routedServer.tau.toFixed(3)})`;
  $("routing-box").hidden = false;
}

async function ask(event) {
  event.preventDefault();
  const status = $("status");
  const request = readRequest();
  status.className = "";
  if (!request.question) {
    status.className = "error";
    status.textContent = "Please type a question.";
    $("question").focus();
    return;
  }
  if (request.options && request.options.length === 1) {
    status.className = "error";
    status.textContent = "Give at least two options, or none for an open question.";
    return;
  }
  $("ask").disabled = true;
  status.textContent = "Thinking…";
  try {
    const response = await fetch("/v1/answer", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request),
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const retry = response.headers.get("Retry-After");
      const message = (data.error && data.error.message) || `request failed (${response.status})`;
      throw new Error(retry ? `${message} (retry in ${retry} s)` : message);
    }
    showResult(request, data);
    addHistory(request, data);
    status.textContent = "Answered.";
  } catch (err) {
    status.className = "error";
    status.textContent = `Error: ${err.message}`;
  } finally {
    $("ask").disabled = false;
  }
}

function init() {
  try {
    const saved = JSON.parse(sessionStorage.getItem("medmoe-history") || "[]");
    if (Array.isArray(saved)) history.push(...saved.slice(0, HISTORY_SIZE));
  } catch (e) { /* ignore a damaged entry */ }
  renderHistory();
  loadRouting();
  $("tau-override").addEventListener("change", () => { $("tau").disabled = !$("tau-override").checked; });
  $("tau").addEventListener("input", () => { $("tau-value").textContent = Number($("tau").value).toFixed(2); });
  $("ask-form").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("ask-form").requestSubmit();
  });
}

init();
