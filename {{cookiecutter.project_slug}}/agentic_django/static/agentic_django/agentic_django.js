// Live runs: while a run fragment works, its text streams in over server-sent events
// (agents:run-stream) and each new event or the end refreshes the fragment at once. Without
// EventSource, or while the stream is down, the fragment's own polling carries on alone.
// Include it after htmx on pages that show run fragments; no inline code (strict CSP).
(() => {
  "use strict";
  if (!("EventSource" in window)) return;

  const streams = new Map(); // run id -> {source, text}

  const fragmentOf = (runId) => document.getElementById(`agent-run-${runId}`);

  function refresh(runId) {
    const element = fragmentOf(runId);
    if (element && window.htmx) window.htmx.trigger(element, "agentic:refresh");
  }

  function render(runId) {
    const state = streams.get(runId);
    const live = fragmentOf(runId)?.querySelector(".agentic-run__live");
    if (!state || !live) return;
    live.textContent = state.text;
    live.hidden = state.text === "";
  }

  function close(runId) {
    streams.get(runId)?.source.close();
    streams.delete(runId);
  }

  function follow(element) {
    const runId = element.dataset.runId;
    const url = element.dataset.streamUrl;
    if (!url || element.dataset.terminal === "true") {
      close(runId);
      return;
    }
    if (streams.has(runId)) {
      render(runId);
      return;
    }
    const state = { source: new EventSource(url), text: "" };
    streams.set(runId, state);
    state.source.addEventListener("delta", (event) => {
      const delta = JSON.parse(event.data);
      state.text = (delta.start ? "" : state.text) + delta.text;
      render(runId);
    });
    state.source.addEventListener("event", (event) => {
      if (JSON.parse(event.data).type === "message_output") state.text = "";
      render(runId);
      refresh(runId);
    });
    state.source.addEventListener("reset", () => {
      state.text = "";
      render(runId);
      refresh(runId);
    });
    state.source.addEventListener("end", () => {
      close(runId);
      refresh(runId);
    });
  }

  function scan(root) {
    root.querySelectorAll?.(".agentic-run[data-run-id]").forEach(follow);
    if (root.matches?.(".agentic-run[data-run-id]")) follow(root);
  }

  document.addEventListener("DOMContentLoaded", () => scan(document));
  document.body?.addEventListener("htmx:afterSettle", (event) => scan(event.detail.elt));
  document.addEventListener("htmx:load", (event) => scan(event.detail.elt));
})();
