"""Streaming replies in Chromium: a real provider client (against a fake OpenAI-compatible
server) streams a slow reply while a worker thread runs it."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from agentic_django.execution import execute
from agentic_django.models import AgentRun
from tests.browser.conftest import DEFERRED, last_run, screenshot, send
from tests.fakes.openai_server import FakeOpenAI, Text
from tests.waiting import PATIENCE, in_thread, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

REPLY = Text(
    "Streaming means the words arrive one after another, so nobody stares at a blank "
    "screen while a slow model thinks.",
    deltas=12,
    delay=0.3,
)


@pytest.fixture
def slow_provider(settings):
    with FakeOpenAI() as fake:
        settings.OPENAI_API_KEY = ""
        settings.OPENAI_BASE_URL = fake.url
        settings.OPENAI_API_MODE = "responses"
        settings.OPENAI_MODEL = "fake-model"
        settings.OPENAI_MAX_RETRIES = 0
        settings.AGENTIC_DJANGO_AGENT_REGISTRY = "chat.registry.get_agent_registry"
        settings.TASKS = DEFERRED  # the test starts the worker itself
        fake.reply(REPLY)
        yield fake


def start_worker(chat_user) -> tuple[AgentRun, object]:
    wait_for(lambda: AgentRun.objects.filter(owner=chat_user).exists(), "the run")
    run = AgentRun.objects.get(owner=chat_user)
    return run, in_thread(lambda: execute(str(run.pk), task_id="worker"))


def streaming(page, chat_user):
    """Send a message, run it in a worker thread and wait for its text to start streaming in:
    the run, the worker and the run's element on the page."""
    send(page, "Tell me about streaming")
    run, worker = start_worker(chat_user)
    element = last_run(page)
    expect(element.locator(".agentic-run__live")).not_to_be_empty(timeout=PATIENCE * 1000)
    return run, worker, element


def ends_with_the_whole_reply_once(page, element) -> None:
    element.and_(page.locator('[data-status="completed"]')).wait_for(timeout=PATIENCE * 1000)
    assert element.inner_text().count("nobody stares at a blank screen") == 1


# Records the reply as shown after every change to the page (a MutationObserver reads the DOM
# once the changing task is done, which is what the next frame paints).
WATCH_THE_REPLY = """() => {
  window.replyShown = [];
  const shown = () => {
    const run = [...document.querySelectorAll("#turns .agentic-run")].pop();
    if (!run) return "";
    return [...run.querySelectorAll(".agentic-msg--assistant")]
      .filter((element) => !element.hidden)
      .map((element) => element.innerText)
      .join(" ");
  };
  new MutationObserver(() => window.replyShown.push(shown())).observe(document.body, {
    subtree: true, childList: true, characterData: true, attributes: true,
  });
}"""


def live_text_snapshots(page, run_element, run: AgentRun) -> list[str]:
    """What the live text showed, looked at repeatedly until the run ended."""
    seen = []
    live = run_element.locator(".agentic-run__live")
    while not AgentRun.objects.get(pk=run.pk).is_terminal:
        if live.count() and live.is_visible():
            seen.append(live.inner_text())
        page.wait_for_timeout(50)
    return seen


def test_the_reply_streams_in_before_the_run_completes(chat, chat_user, slow_provider):
    page = chat
    page.evaluate(WATCH_THE_REPLY)
    run, worker, element = streaming(page, chat_user)
    assert AgentRun.objects.get(pk=run.pk).status == "running"
    assert REPLY.text.startswith(element.locator(".agentic-run__live").inner_text().strip())
    screenshot(page, "chat-streaming")
    ends_with_the_whole_reply_once(page, element)
    worker.join(PATIENCE)
    # From its first word to the end, the reply never vanishes and never shows twice: not
    # when the live text becomes a message, not when a poll or the end swaps the fragment.
    shown = page.evaluate("window.replyShown")
    first_word = REPLY.text.split()[0]
    since_it_appeared = shown[next(n for n, text in enumerate(shown) if first_word in text) :]
    assert all(text.count(first_word) == 1 for text in since_it_appeared), since_it_appeared
    assert "nobody stares at a blank screen" in since_it_appeared[-1]


def test_a_dropped_stream_resumes_without_repeating_text(chat, chat_user, slow_provider):
    page = chat
    run, worker, element = streaming(page, chat_user)
    # The network drops for a moment; EventSource reconnects with its Last-Event-ID.
    page.context.set_offline(True)
    page.wait_for_timeout(400)
    page.context.set_offline(False)
    for shown in live_text_snapshots(page, element, run):
        assert REPLY.text.startswith(shown.strip()), shown
    ends_with_the_whole_reply_once(page, element)
    worker.join(PATIENCE)


def test_cancel_during_a_stream_stops_it(chat, chat_user, slow_provider):
    page = chat
    run, worker, element = streaming(page, chat_user)
    element.get_by_role("button", name="Cancel").click()
    element.and_(page.locator('[data-status="cancelled"]')).wait_for(timeout=PATIENCE * 1000)
    expect(element).to_contain_text("The answer was cut off here.")
    assert AgentRun.objects.get(pk=run.pk).stream_text != REPLY.text
    screenshot(page, "chat-streaming-cancelled")
    worker.join(PATIENCE)


def test_a_message_sent_during_a_reply_interrupts_it(chat, chat_user, slow_provider):
    page = chat
    slow_provider.reply(Text("Here is the other thing.", deltas=2, delay=0.05))
    run, worker, _last = streaming(page, chat_user)
    element = page.locator(f"#agent-run-{run.pk}")  # not the last run once the next is sent
    expect(page.locator("#composer-hint")).to_contain_text("sending now stops it")

    send(page, "Never mind, tell me something else")
    element.and_(page.locator('[data-status="cancelled"]')).wait_for(timeout=PATIENCE * 1000)
    expect(element).to_contain_text("Stopped for a newer message.")
    expect(element).to_contain_text("The answer was cut off here.")
    worker.join(PATIENCE)
    newer = AgentRun.objects.get(owner=chat_user, status="pending")
    assert newer.input_payload == "Never mind, tell me something else"
    assert newer.created_at > run.created_at
    second_worker = in_thread(lambda: execute(str(newer.pk), task_id="worker-2"))
    last_run(page).and_(page.locator('[data-status="completed"]')).wait_for(timeout=PATIENCE * 1000)
    expect(last_run(page)).to_contain_text("Here is the other thing.")
    expect(page.locator("#composer-hint")).to_contain_text("Enter to send")
    second_worker.join(PATIENCE)


def test_without_server_sent_events_the_chat_completes_by_polling(
    chat, chat_user, slow_provider, problems
):
    page = chat
    page.route("**/stream/", lambda route: route.abort())
    problems.expect_console("net::ERR_FAILED")  # the blocked stream, logged as it is retried
    send(page, "Tell me about streaming")
    _run, worker = start_worker(chat_user)
    element = last_run(page)
    element.and_(page.locator('[data-status="completed"]')).wait_for(timeout=PATIENCE * 1000)
    expect(element).to_contain_text("nobody stares at a blank screen")
    worker.join(PATIENCE)
