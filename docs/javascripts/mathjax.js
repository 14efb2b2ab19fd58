// MathJax configuration for pymdownx.arithmatex (generic mode). MathJax itself is served with
// the site (javascripts/mathjax/, added by docs/hooks/mathjax_assets.py), so math renders offline.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

// Material swaps the page content on instant navigation: typeset the new content then. The first
// emission is the page as loaded, which MathJax's own startup typesets; resetting it there would
// drop the CSS of the characters already rendered (blank math). Before MathJax has loaded, or
// when it is missing, there is nothing to reset: do nothing rather than throw.
if (typeof document$ !== "undefined") {
  let firstPage = true;
  document$.subscribe(() => {
    const mj = window.MathJax;
    if (firstPage || !mj || !mj.startup || !mj.startup.output || !mj.typesetPromise) {
      firstPage = false;
      return;
    }
    mj.startup.output.clearCache();
    mj.typesetClear();
    mj.texReset();
    mj.typesetPromise();
  });
}
