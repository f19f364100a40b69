// Measures a page of the book as the browser shows it; tools/check_book.py puts this script first in
// the <head> of a copy of every page it checks (the published site never carries it).
//
// When the page has loaded and its diagrams are drawn (or 10 s have passed), it writes what it found,
// as base64 JSON, into the `data-book-check` attribute of <html>, where `chromium --dump-dom` shows it:
//   requests  every URL the page asked for (resource timing, which lists failed loads too);
//   diagrams  each ```mermaid block: drawn or not, and the smallest text as displayed, in px;
//   code      each code block: how many characters fit without scrolling, and the lines that do not;
//   prose     lines of the rendered text that still look like markdown.
(() => {
  "use strict";
  const TIMEOUT_MS = 10000;
  const diagrams = [];

  // Material draws each diagram into a closed shadow root; open ones let us look inside.
  const attachShadow = Element.prototype.attachShadow;
  Element.prototype.attachShadow = function (init) {
    return attachShadow.call(this, { ...init, mode: "open" });
  };

  // Every URL the page asks for, loaded or failed (Chromium records failed loads too, with status 0).
  performance.setResourceTimingBufferSize(100000);

  // Before Material replaces each <pre class="mermaid"> with its drawing, remember where it was.
  document.addEventListener("DOMContentLoaded", () => {
    for (const pre of document.querySelectorAll("pre.mermaid")) {
      const marker = document.createElement("span");
      marker.hidden = true;
      pre.before(marker);
      diagrams.push({ pre, marker, source: pre.textContent.trim().split("\n")[0] });
    }
  });
  window.addEventListener("load", () => waitForDiagrams(Date.now()));

  function waitForDiagrams(started) {
    const pending = diagrams.some((d) => d.pre.isConnected);
    if (pending && Date.now() - started < TIMEOUT_MS) {
      setTimeout(() => waitForDiagrams(started), 100);
      return;
    }
    let found;
    try {
      found = measure();
    } catch (error) {
      found = { failed: `${error}\n${error.stack}` };
    }
    let binary = "";
    for (const byte of new TextEncoder().encode(JSON.stringify(found))) binary += String.fromCharCode(byte);
    document.documentElement.dataset.bookCheck = btoa(binary);
  }

  function measure() {
    showEverything();
    const sources = new Set(diagrams.map((d) => d.pre));
    const blocks = [...document.querySelectorAll("article pre")].filter((pre) => !sources.has(pre));
    const found = {
      width: window.innerWidth,
      diagrams: diagrams.map(measureDiagram),
      code: blocks.map(measureCode).filter(Boolean),
      prose: rawMarkdown(),
    };
    found.requests = [...new Set(performance.getEntriesByType("resource").map((entry) => entry.name))];
    return found;
  }

  // Collapsed details and inactive tabs are measured as a reader who opens them would see them.
  function showEverything() {
    document.querySelectorAll("details").forEach((details) => (details.open = true));
    const style = document.createElement("style");
    style.textContent = ".tabbed-set > .tabbed-content > .tabbed-block { display: block !important }";
    document.head.append(style);
  }

  function measureDiagram({ pre, marker, source }) {
    const svg = pre.isConnected ? null : marker.nextElementSibling?.shadowRoot?.querySelector("svg");
    if (!svg) return { source, drawn: false };
    const result = { source, drawn: true, error: svg.getAttribute("aria-roledescription") === "error" };
    result.width = Math.round(svg.getBoundingClientRect().width);
    result.boxWidth = marker.nextElementSibling.clientWidth;
    result.naturalWidth = Math.round(svg.viewBox.baseVal?.width || 0);
    result.textPx = Infinity;
    for (const element of svg.querySelectorAll("text, tspan, foreignObject *")) {
      const own = ownText(element);
      const graphic = element instanceof SVGGraphicsElement ? element : element.closest("foreignObject");
      const matrix = own && graphic.getScreenCTM();
      if (!matrix || !element.getClientRects().length) continue;
      const px = parseFloat(getComputedStyle(element).fontSize) * Math.hypot(matrix.a, matrix.b);
      if (px < result.textPx) Object.assign(result, { textPx: px, smallest: ownText(element) });
    }
    if (result.textPx === Infinity) result.textPx = null;
    return result;
  }

  function ownText(element) {
    const texts = [...element.childNodes].filter((n) => n.nodeType === 3).map((n) => n.textContent.trim());
    return texts.filter(Boolean).join(" ");
  }

  // A line overflows when its characters need more width than the block shows without scrolling (a
  // block that wraps its lines, as notebook outputs do, has none unless it scrolls all the same).
  function measureCode(pre) {
    const box = pre.querySelector(":scope > code") || pre;
    if (!box.getClientRects().length) return null;
    const scroller = closestScroller(box);
    const style = getComputedStyle(box);
    const left = box.getBoundingClientRect().left + box.clientLeft + parseFloat(style.paddingLeft);
    const right = scroller.getBoundingClientRect().left + scroller.clientLeft + scroller.clientWidth -
      parseFloat(getComputedStyle(scroller).paddingRight);
    const fits = Math.floor((right - left) / charWidth(box) + 0.01);
    const tab = " ".repeat(parseInt(style.tabSize, 10) || 8);
    const lines = box.textContent.replace(/\n$/, "").split("\n").map((line) => line.replaceAll("\t", tab));
    const wraps = style.textWrapMode === "wrap" || /pre-wrap|pre-line/.test(style.whiteSpace);
    const scrolls = scroller.scrollWidth > scroller.clientWidth + 1;
    const numbered = lines.map((line, i) => [i + 1, line]);
    const long = wraps && !scrolls ? [] : numbered.filter(([, line]) => [...line].length > fits);
    const title = pre.parentElement.querySelector(":scope > .filename")?.textContent || lines[0].trim();
    const kind = pre.closest(".jp-OutputArea") ? "output" : "code";
    return { kind, title, fits, lines: lines.length, long };
  }

  function closestScroller(element) {
    for (let node = element; node && node !== document.body; node = node.parentElement) {
      if (/auto|scroll|hidden/.test(getComputedStyle(node).overflowX)) return node;
    }
    return element;
  }

  function charWidth(box) {
    const probe = document.createElement("span");
    probe.textContent = "0".repeat(100);
    box.append(probe);
    const width = probe.getBoundingClientRect().width / 100;
    probe.remove();
    return width;
  }

  // The page's text outside code blocks and diagrams, searched for markdown that did not render.
  const MARKDOWN = [
    [/^\s*(```|~~~)/, "a code fence"],
    [/^\s*(\?\?\?\+?|!!!)\s/, "an admonition"],
    [/^\s*===\s+"/, "a content tab"],
    [/--8<--/, "a snippet marker"],
    [/\[[^\]\n]+\]\([^)\s]+\)/, "a link"],
    [/\{\s*:?\s*[#.][\w-][^}\n]*\}/, "an attribute list"],
    [/\*\*[^*\s][^*\n]*\*\*/, "bold"],
  ];
  function rawMarkdown() {
    const article = document.querySelector("article");
    const found = [];
    for (const code of article.querySelectorAll("code")) {
      // A fence that did not open a block reads as inline code starting with its language: "python\n...".
      if (!code.closest("pre") && /^[\w+#.-]+\n/.test(code.textContent)) {
        found.push({ what: "a code fence", line: code.textContent.trim().split("\n")[0] });
      }
    }
    for (const code of article.querySelectorAll("pre:not(.mermaid)")) {
      for (const line of code.textContent.split("\n")) {
        if (/^\s*--8<--\s+["']/.test(line)) found.push({ what: "a snippet directive", line });
      }
    }
    const hide = document.createElement("style");
    hide.textContent = "article pre, article code, article .mermaid { display: none !important }";
    document.head.append(hide);
    for (const line of article.innerText.split("\n")) {
      const what = MARKDOWN.filter(([pattern]) => pattern.test(line)).map(([, name]) => name);
      if (what.length) found.push({ what: what.join(", "), line: line.trim() });
    }
    hide.remove();
    return found;
  }
})();
