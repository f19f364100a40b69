// Diagrams that stay readable (listed in mkdocs.yml's extra_javascript, after mermaid.min.js).
//
// mkdocs-material draws each ```mermaid block with mermaid.render and shows the SVG at the column's
// width, however wide the drawing: a 1700 px diagram in a 900 px column has its 16 px text shrunk to
// 8 px. Here every SVG mermaid renders gets a minimum width of 70% of its natural width, so its 16 px
// text stays above 11 px; a diagram wider than that scrolls sideways in its box (extra.css).
(() => {
  "use strict";
  const MIN_SCALE = 0.7;
  const render = mermaid.render;

  function withMinWidth(svg) {
    const tag = /<svg\b[^>]*>/.exec(svg);
    const viewBox = tag && /\sviewBox="[-\d.]+[\s,]+[-\d.]+[\s,]+([\d.]+)/.exec(tag[0]);
    if (!viewBox) return svg;
    const minWidth = `min-width: ${Math.round(parseFloat(viewBox[1]) * MIN_SCALE)}px;`;
    const styled = /\sstyle="/.test(tag[0])
      ? tag[0].replace(/\sstyle="/, (start) => `${start}${minWidth} `)
      : tag[0].replace(/^<svg\b/, `<svg style="${minWidth}"`);
    return svg.replace(tag[0], () => styled);
  }

  mermaid.render = async function (...args) {
    const result = await render.apply(this, args);
    return { ...result, svg: withMinWidth(result.svg) };
  };
})();
