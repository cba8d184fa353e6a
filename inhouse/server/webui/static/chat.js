// The chat page: conversations kept on the server (each user's own), answers streamed from the
// Responses API with the reasoning in a collapsed block and built-in tool calls shown.
import { call, stream, ApiError } from "./api.js";
import { renderMarkdown, copyText } from "./markdown.js";
import { $, node } from "./dom.js";

const state = { conv: null, controller: null, busy: false };

export function initChat(session) {
  const models = $("model");
  models.replaceChildren(...session.server.models.map((m) => new Option(m, m)));
  $("model-label").textContent = session.server.demo ? `${session.server.models[0]} (demo model)` : session.server.models[0] || "";
  $("new-chat").addEventListener("click", () => { newChat(); $("prompt").focus(); });
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
    if (e.key === "Escape") stop();
  });
  $("stop").addEventListener("click", stop);
  newChat();
  loadConversations();
}

function showError(message) {
  const el = $("chat-error");
  el.textContent = message || "";
  el.hidden = !message;
}

async function loadConversations() {
  try {
    const list = await call("GET", "/v1/ui/conversations");
    const ul = $("conversations");
    ul.replaceChildren(...list.data.map((c) => {
      const li = document.createElement("li");
      const open = document.createElement("button");
      open.type = "button";
      open.className = "conv";
      open.textContent = c.title;
      open.title = c.title;
      open.setAttribute("aria-current", String(state.conv?.id === c.id));
      open.addEventListener("click", () => openConversation(c.id));
      const del = document.createElement("button");
      del.type = "button";
      del.className = "delete";
      del.textContent = "✕";
      del.setAttribute("aria-label", `Delete conversation: ${c.title}`);
      del.addEventListener("click", () => deleteConversation(c.id));
      li.append(open, del);
      return li;
    }));
  } catch (e) {
    showError(e.message);
  }
}

function newChat() {
  if (state.busy) stop();
  state.conv = { id: null, title: "", messages: [] };
  renderAll();
  showError("");
  loadConversations();
}

async function openConversation(id) {
  if (state.busy) stop();
  try {
    const c = await call("GET", `/v1/ui/conversations/${encodeURIComponent(id)}`);
    state.conv = { id: c.id, title: c.title, messages: c.messages };
    renderAll();
    showError("");
    loadConversations();
  } catch (e) {
    showError(e.message);
  }
}

async function deleteConversation(id) {
  try {
    await call("DELETE", `/v1/ui/conversations/${encodeURIComponent(id)}`);
    if (state.conv?.id === id) newChat(); else loadConversations();
  } catch (e) {
    showError(e.message);
  }
}

async function save() {
  const c = state.conv;
  const clip = (text, n) => (text && text.length > n ? `${text.slice(0, n - 1)}…` : text);
  const messages = c.messages.map((m) => ({ ...m, tools: (m.tools || []).map((t) => ({
    ...t, detail: clip(t.detail, 20000), output: clip(t.output, 100000) })) }));
  const body = { title: c.title, messages };
  try {
    if (c.id) await call("POST", `/v1/ui/conversations/${encodeURIComponent(c.id)}`, body);
    else c.id = (await call("POST", "/v1/ui/conversations", body)).id;
    loadConversations();
  } catch (e) {
    showError(`This conversation was not saved: ${e.message}`);
  }
}

// ---- rendering -------------------------------------------------------------------------------
function renderAll() {
  const box = $("messages");
  box.replaceChildren(...state.conv.messages.map((m, i) => messageElement(m, i)));
  box.scrollTop = box.scrollHeight;
}

function messageElement(m, index) {
  const el = node("article", `message ${m.role}`);
  el.dataset.index = index;
  el.append(node("div", "role", m.role === "user" ? "You" : `Assistant${m.model ? ` · ${m.model}` : ""}`));
  if (m.role === "user") {
    el.append(node("div", "body", m.content));
    return el;
  }
  fillAssistant(el, m, index);
  return el;
}

function fillAssistant(el, m, index) {
  el.querySelectorAll(":scope > :not(.role)").forEach((n) => n.remove());
  if (m.reasoning) {
    const d = node("details", "reasoning");
    d.append(node("summary", "", m.finish ? "Reasoning" : "Thinking…"), node("div", "text", m.reasoning));
    el.append(d);
  }
  for (const tool of m.tools || []) {
    const box = node("div", `tool ${tool.kind}`);
    box.append(node("strong", "", tool.title));
    if (tool.detail) box.append(node("pre", "", tool.detail));
    if (tool.output) box.append(node("pre", "muted", tool.output));
    el.append(box);
  }
  const answer = node("div", "answer");
  renderMarkdown(answer, m.content);
  el.append(answer);
  if ((m.citations || []).length) el.append(sourcesElement(m.citations));
  if (m.error) {
    el.append(node("p", "note failed", m.error));
  } else if (m.finish === "completed" && !m.content && !(m.tools || []).length) {
    el.append(node("p", "note", "The model finished without an answer (only its reasoning). Try Regenerate."));
  } else if (m.finish && m.finish !== "completed") {
    el.append(node("p", "note", m.finish === "stopped" ? "Stopped." : `Incomplete: ${m.finish}.`));
  }
  if (m.finish) {
    const actions = document.createElement("div");
    actions.className = "msg-actions";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.textContent = "Copy";
    copy.addEventListener("click", () => copyText(m.content, copy));
    actions.append(copy);
    if (index === state.conv.messages.length - 1) {
      const again = document.createElement("button");
      again.type = "button";
      again.textContent = "Regenerate";
      again.addEventListener("click", regenerate);
      actions.append(again);
    }
    el.append(actions);
  }
}

// The documents the answer cites (inhouse:// addresses: shown, not links), with their lines.
function sourcesElement(citations) {
  const box = node("div", "sources");
  box.append(node("strong", "", "Sources"));
  const list = node("ol", "");
  for (const c of citations) {
    const lines = /#L(\d+)(?:-L(\d+))?$/.exec(c.url || "");
    const where = !lines ? "" : lines[2] && lines[2] !== lines[1] ? `, lines ${lines[1]}–${lines[2]}` : `, line ${lines[1]}`;
    const item = node("li", "", `${c.title || "a document"}${where}`);
    item.title = c.url;
    list.append(item);
  }
  box.append(list);
  return box;
}

// ---- sending ---------------------------------------------------------------------------------
function setBusy(busy) {
  state.busy = busy;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("prompt").setAttribute("aria-busy", String(busy));
}

function stop() {
  if (state.controller) state.controller.abort();
}

async function send() {
  const text = $("prompt").value.trim();
  if (!text || state.busy) return;
  $("prompt").value = "";
  const c = state.conv;
  if (!c.title) c.title = text.length > 60 ? `${text.slice(0, 57)}…` : text;
  c.messages.push({ role: "user", content: text });
  renderAll();
  await answer();
}

async function regenerate() {
  if (state.busy) return;
  const msgs = state.conv.messages;
  if (msgs.length && msgs[msgs.length - 1].role === "assistant") msgs.pop();
  renderAll();
  await answer();
}

function requestBody() {
  const tools = [];
  if ($("tool-search").checked) tools.push({ type: "web_search" });
  if ($("tool-python").checked) tools.push({ type: "code_interpreter", container: { type: "auto" } });
  const input = state.conv.messages.filter((m) => !m.error || m.content)
    .map((m) => ({ role: m.role, content: m.content }));
  const body = { model: $("model").value, input, stream: true, store: false,
                 reasoning: { effort: $("effort").value } };
  if (tools.length) body.tools = tools;
  const t = $("temperature").value;
  if (t !== "") body.temperature = Number(t);
  return body;
}

async function answer() {
  showError("");
  const body = requestBody();
  const m = { role: "assistant", content: "", reasoning: "", tools: [], citations: [], model: body.model };
  const msgs = state.conv.messages;
  msgs.push(m);
  const index = msgs.length - 1;
  const el = messageElement(m, index);
  $("messages").append(el);
  let pending = false;
  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      fillAssistant(el, m, index);
      $("messages").scrollTop = $("messages").scrollHeight;
    });
  };
  state.controller = new AbortController();
  setBusy(true);
  try {
    await stream("/v1/responses", body, state.controller.signal, (ev) => { onEvent(m, ev); redraw(); });
    if (!m.finish) m.finish = "completed";
  } catch (e) {
    if (e.name === "AbortError") {
      m.finish = "stopped";
    } else {
      m.finish = "error";
      m.error = e instanceof ApiError ? e.message : `The answer failed: ${e.message}`;
      if (!m.content && !m.reasoning) {  // nothing came: say it above the composer, drop the empty turn
        msgs.pop();
        showError(m.error);
      }
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
  if (!m.reasoning) delete m.reasoning;
  renderAll();
  if (msgs.length && msgs[msgs.length - 1].role === "assistant") await save();
  $("prompt").focus();
}

function onEvent(m, ev) {
  switch (ev.type) {
    case "response.created":
      m.response_id = ev.response.id;
      break;
    case "response.reasoning_text.delta":
      m.reasoning += ev.delta;
      break;
    case "response.output_text.delta":
      m.content += ev.delta;
      break;
    case "response.output_text.annotation.added":
      if (ev.annotation?.type === "url_citation") {
        m.citations = m.citations || [];
        m.citations.push({ title: ev.annotation.title || "", url: ev.annotation.url });
      }
      break;
    case "response.output_item.added":
      if (ev.item.type === "web_search_call") m.tools.push({ kind: "web_search", title: "Searching the documents", detail: "" });
      if (ev.item.type === "code_interpreter_call") m.tools.push({ kind: "code_interpreter", title: "Running Python", detail: ev.item.code || "" });
      if (ev.item.type === "function_call") m.tools.push({ kind: "function", title: `Calling ${ev.item.name}`, detail: ev.item.arguments || "" });
      break;
    case "response.code_interpreter_call_code.delta":
      if (m.tools.length) m.tools[m.tools.length - 1].detail += ev.delta;
      break;
    case "response.function_call_arguments.delta":
      if (m.tools.length) m.tools[m.tools.length - 1].detail += ev.delta;
      break;
    case "response.output_item.done":
      toolDone(m, ev.item);
      break;
    case "response.incomplete":
      m.finish = ev.response.incomplete_details?.reason || "incomplete";
      break;
    case "response.failed":
      m.finish = "error";
      m.error = ev.response.error?.message || "The answer failed.";
      break;
    case "error":
      m.finish = "error";
      m.error = ev.message || ev.error?.message || "The answer failed.";
      break;
    default:
      break;
  }
}

function toolDone(m, item) {
  const last = m.tools[m.tools.length - 1];
  if (!last) return;
  if (item.type === "web_search_call") {
    const a = item.action || {};
    last.title = a.type === "search" ? "Searched the documents" : a.type === "open_page" ? "Opened a document" : "Looked in a document";
    last.detail = a.query || a.url || a.pattern || "";
  } else if (item.type === "code_interpreter_call") {
    last.title = "Ran Python";
    last.detail = item.code || last.detail;
    const logs = (item.outputs || []).map((o) => o.logs || "").join("\n").trim();
    if (logs) last.output = logs;
  }
}
