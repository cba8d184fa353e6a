// The governance console, for auditor and admin keys: the audit log's state, its records (with
// replay and proofs), a person's export and erasure, API keys (admin), a glance at the metrics.
import { call, download } from "./api.js";
import { $, node } from "./dom.js";

let current = null;  // the record whose detail is shown

export function initConsole(session) {
  $("keys-card").hidden = session.role !== "admin";
  $("verify").addEventListener("click", verify);
  $("metrics-refresh").addEventListener("click", metrics);
  $("record-filter").addEventListener("submit", (e) => { e.preventDefault(); search(); });
  $("download-proof").addEventListener("click", proof);
  $("replay").addEventListener("click", replay);
  $("subject-form").addEventListener("submit", (e) => { e.preventDefault(); exportSubject(); });
  $("erase").addEventListener("click", eraseSubject);
  $("key-form").addEventListener("submit", (e) => { e.preventDefault(); createKey(); });
  $("copy-key").addEventListener("click", () => navigator.clipboard.writeText($("new-key").value).catch(() => {}));
  $("confirm-input").addEventListener("input", () => {
    $("confirm-ok").disabled = $("confirm-input").value !== $("confirm-input").dataset.expected;
  });
}

export function showConsole(session) {
  verify();
  metrics();
  search();
  if (session.role === "admin") keys();
}

function fail(e) {
  const el = $("console-error");
  el.textContent = e ? e.message : "";
  el.hidden = !e;
}

const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "");
const cell = (text, cls) => node("td", cls, text ?? "");

// ---- the log's state -------------------------------------------------------------------------
async function verify() {
  const box = $("log-state");
  box.replaceChildren(node("p", "muted", "Verifying…"));
  try {
    const v = await call("GET", "/v1/audit/verify");
    const dl = document.createElement("dl");
    dl.className = "grid";
    const row = (k, val, cls) => {
      dl.append(node("dt", "", k),
                node("dd", cls || "", val));
    };
    row("Verification", v.ok ? "verified: every record, content and checkpoint checks out" : `FAILED: ${v.problem}`, v.ok ? "ok" : "bad");
    row("Records", String(v.records));
    row("Signed checkpoints", String(v.checkpoints));
    row("Not yet sealed", String(v.unsealed));
    const cp = v.last_checkpoint;
    row("Last checkpoint", cp ? `${cp.tree_size} records, signed ${when(cp.signed_at)} by key ${cp.key_id.slice(0, 16)}…` : "none yet");
    if (cp) row("Root", cp.root);
    if (!v.ok && v.first_bad_index !== null) row("First bad record", String(v.first_bad_index), "bad");
    box.replaceChildren(dl, node("p", "hint", v.note));
    fail(null);
  } catch (e) {
    box.replaceChildren();
    fail(e);
  }
}

// ---- metrics ---------------------------------------------------------------------------------
function parseMetrics(text) {
  const sums = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/);
    if (!m) continue;
    const v = Number(m[3]);
    if (!Number.isNaN(v)) sums[m[1]] = (sums[m[1]] || 0) + v;
  }
  return sums;
}

async function metrics() {
  try {
    const res = await call("GET", "/metrics", undefined, { raw: true });
    const s = parseMetrics(await res.text());
    const ttft = s.inhouse_time_to_first_token_seconds_count ? (s.inhouse_time_to_first_token_seconds_sum / s.inhouse_time_to_first_token_seconds_count).toFixed(2) + " s" : "–";
    const rows = [
      ["HTTP requests", s.inhouse_requests_total ?? 0],
      ["Running / waiting", `${s.inhouse_running_requests ?? 0} / ${s.inhouse_queue_depth ?? 0}`],
      ["Prompt tokens", s.inhouse_prompt_tokens_total ?? 0],
      ["Generated tokens", s.inhouse_completion_tokens_total ?? 0],
      ["Mean time to first token", ttft],
      ["KV cache in use", `${(100 * (s.inhouse_kv_usage_ratio ?? 0)).toFixed(1)} %`],
      ["Prefix cache hit ratio", `${(100 * (s.inhouse_prefix_cache_hit_ratio ?? 0)).toFixed(1)} %`],
    ];
    $("metrics").replaceChildren(...rows.flatMap(([k, v]) => [
      node("dt", "", k),
      node("dd", "", String(v))]));
  } catch (e) {
    $("metrics").replaceChildren(node("dd", "", e.message));
  }
}

// ---- records ---------------------------------------------------------------------------------
function seconds(value) {
  return value ? String(new Date(value).getTime() / 1000) : "";
}

let searches = 0;  // only the latest search's answer is shown

async function search() {
  const mine = ++searches;
  $("records-note").textContent = "Searching…";
  const f = new FormData($("record-filter"));
  const q = new URLSearchParams();
  for (const k of ["subject", "key_id", "finish_reason"]) if (f.get(k)) q.set(k, f.get(k));
  if (f.get("since")) q.set("since", seconds(f.get("since")));
  if (f.get("until")) q.set("until", seconds(f.get("until")));
  q.set("limit", "100");
  try {
    const r = await call("GET", `/v1/audit/search?${q}`);
    if (mine !== searches) return;
    const body = $("records").querySelector("tbody");
    body.replaceChildren(...r.data.map((rec) => {
      const tr = document.createElement("tr");
      tr.className = "record";
      tr.tabIndex = 0;
      tr.dataset.record = rec.record_id;
      const tokens = rec.completion_tokens != null ? `${rec.prompt_tokens} → ${rec.completion_tokens}` : "";
      tr.append(cell(when(rec.created_at)), cell(rec.record_id), cell(rec.subject), cell(rec.api_key_id),
                cell(rec.endpoint || rec.kind), cell(rec.finish_reason), cell(tokens),
                cell(rec.verified ? "yes" : "NO", rec.verified ? "ok" : "bad"));
      const open = () => detail(rec.record_id);
      tr.addEventListener("click", open);
      tr.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } });
      return tr;
    }));
    $("records-note").textContent = `${r.data.length} record(s)` + (r.truncated ? `; the search stopped after ${r.scanned_leaves} log entries: narrow it by time` : "");
    fail(null);
  } catch (e) {
    fail(e);
  }
}

async function detail(id) {
  try {
    const r = await call("GET", `/v1/audit/records/${encodeURIComponent(id)}`);
    current = id;
    $("detail-title").textContent = `Record ${id}`;
    $("detail-json").textContent = JSON.stringify(r.leaves, null, 2);
    const start = r.leaves[0];
    const done = r.leaves.find((l) => l.kind === "completion");
    $("replay").disabled = !(start.kind === "request" && done && start.content && start.content.prompt_ids);
    $("replay-result").textContent = "";
    $("record-detail").hidden = false;
    $("detail-title").scrollIntoView({ block: "nearest" });
    fail(null);
  } catch (e) {
    fail(e);
  }
}

async function proof() {
  const out = $("replay-result");  // said beside the buttons: "not sealed yet" is common
  try {
    download(`${current}.proof.json`, await call("GET", `/v1/audit/records/${encodeURIComponent(current)}/proof`));
    out.textContent = "Proof downloaded: check it offline with `inhouse audit check-proof`.";
    out.className = "muted";
  } catch (e) {
    out.textContent = e.message;
    out.className = "bad";
  }
}

async function replay() {
  const out = $("replay-result");
  out.textContent = "Replaying…";
  out.className = "muted";
  try {
    const r = await call("POST", `/v1/audit/records/${encodeURIComponent(current)}/replay`);
    out.textContent = r.identical ? `Identical: ${r.num_replayed} output tokens reproduced bit for bit`
      : `DIFFERENT from token ${r.first_difference} (${r.num_logged} logged, ${r.num_replayed} replayed)`;
    out.className = r.identical ? "ok" : "bad";
  } catch (e) {
    out.textContent = e.message;
    out.className = "bad";
  }
}

// ---- a person's data -------------------------------------------------------------------------
async function exportSubject() {
  const subject = $("s-subject").value.trim();
  if (!subject) return;
  try {
    const data = await call("GET", `/v1/audit/export?subject=${encodeURIComponent(subject)}`);
    download(`export-${subject}.json`, data);
    $("subject-result").textContent = `Exported ${data.records.length} audit entries, ${data.stored_responses.length} stored response(s) and ${data.conversations.length} conversation(s) for ${subject}.`;
    fail(null);
  } catch (e) {
    fail(e);
  }
}

function confirmWith(text, expected) {
  const dialog = $("confirm-dialog");
  $("confirm-text").textContent = text;
  $("confirm-label").textContent = `Type “${expected}” to confirm`;
  const input = $("confirm-input");
  input.value = "";
  input.dataset.expected = expected;
  $("confirm-ok").disabled = true;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok" && input.value === expected), { once: true });
    dialog.showModal();
    input.focus();
  });
}

async function eraseSubject() {
  const subject = $("s-subject").value.trim();
  if (!subject) { $("s-subject").reportValidity(); return; }
  const ok = await confirmWith(`Erase every prompt, answer, stored response and conversation of “${subject}”? This cannot be undone; the erasure itself is recorded in the audit log.`, subject);
  if (!ok) { $("subject-result").textContent = "Nothing was erased."; return; }
  try {
    const r = await call("POST", "/v1/audit/erase", { subject, confirm: subject });
    $("subject-result").textContent = `Erased ${subject}: the content of ${r.audit_records} audit record(s), ${r.stored_responses} stored response(s) and ${r.conversations} conversation(s).`;
    fail(null);
    search();
  } catch (e) {
    fail(e);
  }
}

// ---- keys (admin) ----------------------------------------------------------------------------
async function keys() {
  try {
    const r = await call("GET", "/v1/admin/keys");
    $("keys").querySelector("tbody").replaceChildren(...r.data.map((k) => {
      const tr = document.createElement("tr");
      tr.append(cell(k.id), cell(k.name), cell(k.role), cell(k.tenant), cell(k.subject), cell(`${k.prefix}…`),
                cell(k.revoked_at ? `revoked ${when(k.revoked_at)}` : "active", k.revoked_at ? "muted" : "ok"));
      const td = document.createElement("td");
      if (!k.revoked_at) {
        const b = document.createElement("button");
        b.type = "button";
        b.className = "danger";
        b.textContent = "Revoke";
        b.setAttribute("aria-label", `Revoke key ${k.name} (${k.id})`);
        b.addEventListener("click", () => revoke(k));
        td.append(b);
      }
      tr.append(td);
      return tr;
    }));
  } catch (e) {
    fail(e);
  }
}

async function createKey() {
  const f = new FormData($("key-form"));
  const body = { name: f.get("name"), role: f.get("role") };
  for (const k of ["tenant", "subject"]) if (f.get(k)) body[k] = f.get(k);
  if (f.get("rate_limit")) body.rate_limit = Number(f.get("rate_limit"));
  try {
    const k = await call("POST", "/v1/admin/keys", body);
    $("new-key").value = k.key;
    $("key-dialog").showModal();
    $("key-dialog").addEventListener("close", () => { $("new-key").value = ""; }, { once: true });
    $("key-form").reset();
    keys();
    fail(null);
  } catch (e) {
    fail(e);
  }
}

async function revoke(k) {
  if (!(await confirmWith(`Revoke the key “${k.name}” (${k.id})? Requests with it will be refused at once.`, k.id))) return;
  try {
    await call("DELETE", `/v1/admin/keys/${encodeURIComponent(k.id)}`);
    keys();
    fail(null);
  } catch (e) {
    fail(e);
  }
}
