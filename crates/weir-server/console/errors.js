// Loaded first, as a classic script: every uncaught error and rejection of the page is kept in
// `window.weirErrors` (the browser tests assert it stays empty) and still reaches the console.
window.weirErrors = [];
window.addEventListener("error", (e) => {
  window.weirErrors.push(String(e.message || e.error || "error"));
});
window.addEventListener("unhandledrejection", (e) => {
  window.weirErrors.push(`unhandled rejection: ${e.reason && e.reason.stack ? e.reason.stack : e.reason}`);
});
