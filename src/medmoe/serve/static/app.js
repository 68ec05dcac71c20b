// The medmoe page: POST /v1/answer and show the answer, the expert and why, latency and a history.
// Plain JS, no dependencies; text is always inserted with textContent (never as HTML).
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];
const HISTORY_SIZE = 10;

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

function showResult(request, data) {
  const answer = data.answer_text ? `${data.answer}. ${data.answer_text}` : (data.answer || "(empty answer)");
  $("answer").textContent = answer;
  $("expert").textContent = data.expert;
  $("gate").textContent = data.gate_probability === null ? "no router (single model)" : data.gate_probability.toFixed(3);
  $("latency").textContent = describeLatency(data.latency_ms) + ` · batch of ${data.batch_size}` +
    (data.truncated_context_tokens ? ` · context cut by ${data.truncated_context_tokens} tokens` : "");

  const features = $("features");
  clear(features);
  if (data.top_features.length === 0) {
    features.appendChild(item("li", "No gate features: this server runs a single model, so no routing decision was made."));
  }
  for (const f of data.top_features) {
    features.appendChild(item("li", `${f.name}: ${f.contribution >= 0 ? "+" : ""}${f.contribution.toFixed(3)}`));
  }

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
                    expert: data.expert, ms: data.latency_ms.total });
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
    li.appendChild(item("div", `→ ${h.answer} (${h.expert}, ${Math.round(h.ms)} ms)`, "meta"));
    list.appendChild(li);
  }
}

function readRequest() {
  const request = { question: $("question").value.trim() };
  const context = $("context").value.trim();
  const options = $("options").value.split("\n").map((s) => s.trim()).filter(Boolean);
  if (context) request.context = context;
  if (options.length) request.options = options;
  return request;
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
  $("ask-form").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("ask-form").requestSubmit();
  });
}

init();
