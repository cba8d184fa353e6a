// The page's two DOM helpers, shared by every script.
export const $ = (id) => document.getElementById(id);

// an element with a class and a text (set as text: never parsed as HTML)
export function node(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}
