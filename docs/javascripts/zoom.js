// Click a figure to see it at full size over the page; click again or press Escape to close.
function essZoomSetup() {
  document.querySelectorAll(".md-typeset img").forEach((img) => {
    if (img.closest("a") || img.classList.contains("ess-zoomable")) return;
    img.classList.add("ess-zoomable");
    img.title = img.title || "Click to enlarge";
    img.addEventListener("click", () => {
      const box = document.createElement("div");
      box.className = "ess-lightbox";
      const big = document.createElement("img");
      big.src = img.currentSrc || img.src;
      big.alt = img.alt;
      box.appendChild(big);
      const close = () => {
        box.remove();
        document.removeEventListener("keydown", onKey);
      };
      const onKey = (event) => {
        if (event.key === "Escape") close();
      };
      box.addEventListener("click", close);
      document.addEventListener("keydown", onKey);
      document.body.appendChild(box);
    });
  });
}

if (typeof document$ !== "undefined") {
  document$.subscribe(essZoomSetup);
} else {
  document.addEventListener("DOMContentLoaded", essZoomSetup);
}
