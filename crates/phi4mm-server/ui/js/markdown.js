// Model output is untrusted text. It becomes HTML here and only here: markdown (marked, GitHub
// flavour) with code highlighted (highlight.js) and maths typeset (KaTeX: $…$, \(…\), $$…$$,
// \[…\]), then the whole HTML through DOMPurify before it reaches the page, so a reply holding
// <script>, an onerror attribute or a javascript: link renders inert. Links open in a new tab.

const { marked, DOMPurify, hljs, katex } = window;

function tex(src, display) {
  try {
    return katex.renderToString(src, { displayMode: display, throwOnError: false, output: "html" });
  } catch (_) {
    return escapeHtml(src);
  }
}

export function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

const blockMath = {
  name: "blockMath",
  level: "block",
  start(src) {
    const m = src.match(/\$\$|\\\[/);
    return m ? m.index : undefined;
  },
  tokenizer(src) {
    const m = /^\$\$([\s\S]+?)\$\$/.exec(src) || /^\\\[([\s\S]+?)\\\]/.exec(src);
    if (m) return { type: "blockMath", raw: m[0], text: m[1].trim() };
    return undefined;
  },
  renderer(t) {
    return `<div class="math">${tex(t.text, true)}</div>`;
  },
};

const inlineMath = {
  name: "inlineMath",
  level: "inline",
  start(src) {
    const m = src.match(/\$|\\\(/);
    return m ? m.index : undefined;
  },
  tokenizer(src) {
    const m = /^\$\$([\s\S]+?)\$\$/.exec(src) || /^\$(?!\s)((?:\\\$|[^$\n])+?)(?<!\s)\$(?!\d)/.exec(src) || /^\\\(([\s\S]+?)\\\)/.exec(src);
    if (m) return { type: "inlineMath", raw: m[0], text: m[1], display: m[0].startsWith("$$") };
    return undefined;
  },
  renderer(t) {
    return tex(t.text, t.display);
  },
};

marked.use({
  gfm: true,
  breaks: true,
  extensions: [blockMath, inlineMath],
  renderer: {
    code({ text, lang }) {
      const language = (lang || "").trim().split(/\s+/)[0];
      let body;
      if (language && hljs.getLanguage(language)) {
        body = hljs.highlight(text, { language, ignoreIllegals: true }).value;
      } else {
        body = escapeHtml(text);
      }
      const cls = language ? ` language-${escapeHtml(language)}` : "";
      return `<pre><code class="hljs${cls}">${body}</code></pre>\n`;
    },
  },
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

/** Markdown to sanitised HTML (a string safe to assign to innerHTML). */
export function render(text) {
  let html;
  try {
    html = marked.parse(text);
  } catch (_) {
    html = `<p>${escapeHtml(text)}</p>`;
  }
  return DOMPurify.sanitize(html, { USE_PROFILES: { html: true, svg: true, mathMl: true }, FORBID_TAGS: ["style", "form", "input", "button", "textarea"] });
}

/** Adds a copy button to every code block under `el`. */
export function enhance(el) {
  for (const pre of el.querySelectorAll("pre")) {
    if (pre.querySelector(".copy")) continue;
    const b = document.createElement("button");
    b.type = "button";
    b.className = "copy";
    b.textContent = "Copy";
    b.addEventListener("click", async () => {
      const code = pre.querySelector("code");
      try {
        await navigator.clipboard.writeText(code ? code.textContent : pre.textContent);
        b.textContent = "Copied";
      } catch (_) {
        b.textContent = "Copy failed";
      }
      setTimeout(() => (b.textContent = "Copy"), 1500);
    });
    pre.appendChild(b);
  }
}
