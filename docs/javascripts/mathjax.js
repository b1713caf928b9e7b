// MathJax settings. Pages and docstrings: pymdownx.arithmatex (generic mode)
// emits \( ... \) inline and \[ ... \] displayed, inside elements of class
// "arithmatex". Notebooks: mkdocs-jupyter leaves the $ ... $ and $$ ... $$ of
// their Markdown cells as written, inside elements of class "jp-MarkdownOutput".
// Nothing else is typeset: MathJax skips every element that has a class
// unless it has one of those two, and unclassed elements (<p>, <li>) inherit.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".+",
    processHtmlClass: "arithmatex|jp-MarkdownOutput",
  },
};

// Material's instant navigation swaps pages without a reload: typeset again.
if (typeof document$ !== "undefined") {
  document$.subscribe(() => {
    if (window.MathJax && MathJax.typesetPromise) {
      MathJax.startup.output.clearCache();
      MathJax.typesetClear();
      MathJax.texReset();
      MathJax.typesetPromise();
    }
  });
}
