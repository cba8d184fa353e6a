// Markdown to safe HTML: marked parses, DOMPurify removes anything active (scripts, event
// handlers, javascript: links), and the page's Content-Security-Policy stops what might be left.
import { marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.js";

marked.setOptions({ gfm: true, breaks: false });

// An image from another server is how injected text leaks a conversation (the data rides in its
// URL): images load from this server (or data:) only, never from elsewhere, before CSP is asked.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName !== "IMG") return;
  const src = node.getAttribute("src") || "";
  let local = src.startsWith("data:");
  try { local = local || new URL(src, location.href).origin === location.origin; } catch (_) { local = false; }
  if (!local) {
    node.removeAttribute("src");
    node.removeAttribute("srcset");
    node.setAttribute("alt", `[remote image not loaded: ${src.slice(0, 200)}]`);
  }
});

export function renderMarkdown(el, text) {
  el.innerHTML = DOMPurify.sanitize(marked.parse(text || ""), { USE_PROFILES: { html: true } });
  for (const a of el.querySelectorAll("a")) {
    a.rel = "noopener noreferrer";
    a.target = "_blank";
  }
  for (const pre of el.querySelectorAll("pre")) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy-code";
    button.textContent = "Copy code";
    button.addEventListener("click", () => copyText(pre.querySelector("code")?.textContent ?? pre.textContent, button));
    pre.append(button);
  }
}

export async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    flash(button, "Copied");
  } catch (_) {
    flash(button, "Copy failed");
  }
}

function flash(button, label) {
  const was = button.textContent;
  button.textContent = label;
  setTimeout(() => { button.textContent = was; }, 1500);
}
