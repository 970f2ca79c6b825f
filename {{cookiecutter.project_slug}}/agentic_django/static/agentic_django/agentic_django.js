// Live runs: while a run fragment works, its text streams in over server-sent events
// (agents:run-stream) and each new event or the end refreshes the fragment at once. Without
// EventSource, or while the stream is down, the fragment's own polling carries on alone.
// The live text stays on screen until a swapped-in fragment shows the message it became, and
// a swapped-in fragment gets the live text in the same task (htmx:afterSwap, not at settle):
// no frame shows the reply blank or twice. A run that asks for approval scrolls its
// Approve/Reject card into view once, wherever the reader had scrolled to.
// Include it after htmx on pages that show run fragments; no inline code (strict CSP).
(() => {
  "use strict";

  const streams = new Map(); // run id -> {source, text, clearAbove}

  const fragmentOf = (runId) => document.getElementById(`agent-run-${runId}`);
  const ENTRIES = ".agentic-msg:not(.agentic-run__live), .agentic-tool";
  const entries = (element) => (element ? element.querySelectorAll(ENTRIES).length : 0);

  const shownApprovals = new Set(); // "run:call,call" cards already brought into view

  function showApprovals(element) {
    const card = element.querySelector(".agentic-approvals");
    if (!card) return;
    const calls = [...card.querySelectorAll("[data-call-id]")].map((call) => call.dataset.callId);
    const key = `${element.dataset.runId}:${calls.join(",")}`;
    if (shownApprovals.has(key)) return;
    shownApprovals.add(key);
    card.scrollIntoView({ block: "nearest" });
  }

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
    showApprovals(element);
    const runId = element.dataset.runId;
    const url = element.dataset.streamUrl;
    if (!url || element.dataset.terminal === "true") {
      close(runId);
      return;
    }
    const known = streams.get(runId);
    if (known) {
      // The message the live text became is in this fragment: show it instead, not both.
      if (known.clearAbove !== null && entries(element) > known.clearAbove) {
        known.text = "";
        known.clearAbove = null;
      }
      render(runId);
      return;
    }
    if (!("EventSource" in window)) return; // the fragment's polling carries on alone
    const state = { source: new EventSource(url), text: "", clearAbove: null };
    streams.set(runId, state);
    state.source.addEventListener("delta", (event) => {
      const delta = JSON.parse(event.data);
      if (delta.start) {
        state.text = "";
        state.clearAbove = null;
      }
      state.text += delta.text;
      render(runId);
    });
    state.source.addEventListener("event", (event) => {
      // Kept until the refreshed fragment shows the message (clearing now would blank it).
      if (JSON.parse(event.data).type === "message_output" && state.clearAbove === null) {
        state.clearAbove = entries(fragmentOf(runId));
      }
      refresh(runId);
    });
    state.source.addEventListener("reset", () => {
      state.text = "";
      state.clearAbove = null;
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
  // afterSwap runs in the swap's own task; htmx:load and afterSettle come a settle delay later.
  document.body?.addEventListener("htmx:afterSwap", (event) => scan(event.target));
  document.body?.addEventListener("htmx:afterSettle", (event) => scan(event.detail.elt));
  document.addEventListener("htmx:load", (event) => scan(event.detail.elt));
})();
