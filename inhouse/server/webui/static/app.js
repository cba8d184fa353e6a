// The page's start: sign in with an API key (kept in this tab's session storage only), then the
// chat, and the governance console for auditor and admin keys (#console).
import { call, saveKey, savedKey } from "./api.js";
import { initChat } from "./chat.js";
import { initConsole, showConsole } from "./console.js";
import { $ } from "./dom.js";

let session = null;

function show(id) {
  for (const s of ["loading", "signin", "chat", "console"]) $(s).hidden = s !== id;
  $("tab-chat").setAttribute("aria-current", id === "chat" ? "page" : "false");
  $("tab-console").setAttribute("aria-current", id === "console" ? "page" : "false");
}

const mayAudit = () => session && session.server.audit && (session.role === "auditor" || session.role === "admin");

function route(event) {
  if (!session) return;
  // an in-page anchor (the skip link's #main) is not a page: the focus stays where it went
  if (event && !["", "#chat", "#console"].includes(location.hash)) return;
  if (location.hash === "#console") {
    if (!mayAudit()) {
      show("chat");
      const el = $("chat-error");
      el.textContent = session.server.audit
        ? `The governance console needs an auditor or admin key; this key has the '${session.role}' role.`
        : "The audit log is off on this server: there is no governance console.";
      el.hidden = false;
      return;
    }
    show("console");
    showConsole(session);
  } else {
    show("chat");
    $("prompt").focus();
  }
}

async function signIn(key) {
  saveKey(key);
  try {
    session = await call("GET", "/v1/ui/me");
  } catch (e) {
    saveKey("");
    session = null;
    throw e;
  }
  if (key === "" && session.keys_required) { session = null; throw new Error("A key is needed."); }
  $("who").textContent = session.keys_required ? `${session.name} · ${session.role} · ${session.tenant}` : "no keys on this server (local use)";
  $("sign-out").hidden = !session.keys_required;
  $("tabs").hidden = false;
  $("tab-console").hidden = !mayAudit();
  initChat(session);
  if (mayAudit()) initConsole(session);
  route();
}

async function start() {
  $("signin-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("signin-error").textContent = "";
    try {
      await signIn($("api-key").value.trim());
      $("api-key").value = "";
    } catch (err) {
      $("signin-error").textContent = err.status === 401 ? "This key is not valid (or was revoked)." : err.message;
    }
  });
  $("sign-out").addEventListener("click", () => { saveKey(""); location.hash = ""; location.reload(); });
  $("tab-chat").addEventListener("click", () => { location.hash = "#chat"; });
  $("tab-console").addEventListener("click", () => { location.hash = "#console"; });
  window.addEventListener("hashchange", route);
  try {
    await signIn(savedKey());  // a key from earlier in this tab, or a server with no keys
  } catch (_) {
    show("signin");
    $("api-key").focus();
  }
}

start();
