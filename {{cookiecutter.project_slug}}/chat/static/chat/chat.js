// Chat page behaviour that htmx attributes cannot express without inline code (the CSP forbids
// it): keyboard submit, one message in flight at a time (a message sent while a reply is on
// its way interrupts it: the form posts multitask_strategy=interrupt), clearing the input,
// scrolling, error toasts and the conversation list folded away on narrow screens.
(() => {
  "use strict";

  const form = document.getElementById("composer");
  if (!form) return;
  const textarea = form.querySelector("textarea");
  const send = form.querySelector("button[type=submit]");
  const log = document.getElementById("conversation");
  const turns = document.getElementById("turns");
  const toast = document.getElementById("toast");
  const idleText = form.querySelector("[data-idle-text]");
  const busyText = form.querySelector("[data-busy-text]");
  const budgetText = form.querySelector("[data-budget-text]");
  const sidebar = document.querySelector(".sidebar");
  const foldToggle = document.getElementById("conversations-toggle");
  const MAX_ROWS = 8;
  let submitting = false;
  let stickToBottom = true;
  let toastTimer = null;

  const activeRun = () => {
    const active = turns.querySelectorAll('.agentic-run[data-terminal="false"]');
    return active.length ? active[active.length - 1] : null;
  };
  const nearBottom = () => log.scrollHeight - log.scrollTop - log.clientHeight < 80;
  const scrollToEnd = () => {
    log.scrollTop = log.scrollHeight;
  };

  // Send is disabled while a message is being sent; while a run works, the hint says that
  // sending stops it (a run paused on its budget is not on its way: the hint says so).
  function syncComposer() {
    const run = activeRun();
    const working = run !== null;
    const onBudget = working && run.dataset.status === "budget_exceeded";
    send.disabled = submitting;
    form.setAttribute("aria-busy", String(submitting || (working && !onBudget)));
    idleText.hidden = working;
    busyText.hidden = !working || onBudget;
    budgetText.hidden = !onBudget;
  }

  function resizeInput() {
    const lines = textarea.value.split("\n").length;
    textarea.rows = Math.min(Math.max(lines, 1), MAX_ROWS);
  }

  function showToast(message) {
    toast.textContent = message;
    toast.hidden = false;
    window.clearTimeout(toastTimer);
    toastTimer = window.setTimeout(() => {
      toast.hidden = true;
    }, 8000);
  }

  function submitIfReady() {
    if (!send.disabled && textarea.value.trim() !== "") form.requestSubmit();
  }

  textarea.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submitIfReady();
    }
  });
  textarea.addEventListener("input", resizeInput);

  document.querySelectorAll("[data-suggestion]").forEach((button) => {
    button.addEventListener("click", () => {
      textarea.value = button.dataset.suggestion;
      resizeInput();
      textarea.focus();
      submitIfReady();
    });
  });

  form.addEventListener("htmx:beforeRequest", (event) => {
    if (event.detail.elt !== form) return;
    if (send.disabled || textarea.value.trim() === "") {
      event.preventDefault();
      return;
    }
    submitting = true;
    stickToBottom = true;
    syncComposer();
  });

  form.addEventListener("htmx:afterRequest", (event) => {
    if (event.detail.elt !== form) return;
    submitting = false;
    // 4xx answers are swapped in as visible error fragments; keep the text to retry.
    if (event.detail.xhr && event.detail.xhr.status < 300) {
      form.reset();
      resizeInput();
      document.getElementById("empty-state")?.remove();
    }
    textarea.focus();
    syncComposer();
  });

  document.body.addEventListener("htmx:beforeSwap", (event) => {
    if (log.contains(event.detail.target)) stickToBottom = stickToBottom || nearBottom();
  });

  document.body.addEventListener("htmx:afterSettle", () => {
    syncComposer();
    if (stickToBottom) scrollToEnd();
    stickToBottom = nearBottom();
    // A swapped-out control (e.g. Cancel) drops focus to <body>; bring it back to the input.
    if (document.activeElement === document.body) textarea.focus();
  });

  // 5xx bodies are not swapped in; show their error message (if any) in a toast instead.
  function serverMessage(xhr) {
    const html = new DOMParser().parseFromString(xhr.responseText || "", "text/html");
    return html.querySelector(".agentic-error__message")?.textContent.trim();
  }

  document.body.addEventListener("htmx:responseError", (event) => {
    const xhr = event.detail.xhr;
    if (xhr.status >= 500) {
      showToast(serverMessage(xhr) || `The server had a problem (${xhr.status}). Please try again.`);
    }
  });
  document.body.addEventListener("htmx:sendError", () => {
    showToast("Cannot reach the server. Check your connection and try again.");
  });

  // Without this script the list stays open; with it, narrow screens show it on request.
  if (sidebar && foldToggle) {
    sidebar.classList.add("sidebar--foldable");
    foldToggle.hidden = false;
    foldToggle.addEventListener("click", () => {
      const open = sidebar.classList.toggle("sidebar--open");
      foldToggle.setAttribute("aria-expanded", String(open));
      foldToggle.querySelector("[data-toggle-label]").textContent = open ? "Hide" : "Show";
    });
  }

  log.addEventListener("scroll", () => {
    stickToBottom = nearBottom();
  });

  syncComposer();
  scrollToEnd();
})();
