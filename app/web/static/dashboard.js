// Live progress through the service's own SSE stream (GET /ui/jobs/{id}/progress = the API's stream).
"use strict";
function follow(url, onProgress, onEnd) {
  const source = new EventSource(url);
  source.addEventListener("progress", (e) => onProgress(JSON.parse(e.data)));
  source.addEventListener("end", (e) => { source.close(); onEnd(JSON.parse(e.data)); });
  source.onerror = () => source.close();
}
function describe(snap) {
  const p = snap.progress || {};
  return ((p.fraction || 0) * 100).toFixed(1) + "% " + (p.message || "");
}
document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("tr[data-live]").forEach((row) => {
    follow(row.dataset.live, (snap) => {
      row.querySelector("[data-field=status]").textContent = snap.status;
      row.querySelector("progress").value = (snap.progress || {}).fraction || 0;
      row.querySelector("[data-field=message]").textContent = describe(snap);
    }, (snap) => { row.querySelector("[data-field=status]").textContent = snap.status; });
  });
  const live = document.getElementById("live");
  if (live) {
    follow(live.dataset.live, (snap) => {
      document.getElementById("state").textContent = snap.status;
      document.getElementById("progress").value = (snap.progress || {}).fraction || 0;
      document.getElementById("progress-message").textContent = describe(snap);
    }, (snap) => {
      live.textContent = "Job " + snap.status + "; reloading for its results.";
      if (snap.status === "succeeded") window.location.reload();
    });
  }
});
