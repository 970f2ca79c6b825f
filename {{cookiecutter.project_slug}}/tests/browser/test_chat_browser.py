"""The chat in a real browser: log in, chat with tool calls, polling, cancel, errors, keyboard."""

from __future__ import annotations

import re
import threading

import pytest
from django.db import connections
from playwright.sync_api import expect

from agentic_django.models import AgentRun
from agentic_django.tasks import execute_agent_run
from tests.browser.conftest import DEFERRED, IMMEDIATE, last_run, screenshot, send
from tests.web.registry import MODEL_ERROR, PROVIDER_TEXT

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def run_in_background(run_id: str, settings, server) -> None:
    """Execute a deferred run the way a worker would, outside the browser's event loop."""
    settings.TASKS = IMMEDIATE
    error: list[BaseException] = []

    def work() -> None:
        try:
            execute_agent_run.enqueue(run_id)  # the queued task reaches a worker
        except BaseException as exc:
            error.append(exc)
        finally:
            connections["default"].close()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not error, error


def test_chat_shows_the_reply_and_the_tool_call(chat):
    page = chat
    screenshot(page, "chat-new")
    send(page, "What is (12 + 7) * 3?")

    run = last_run(page)
    run.and_(page.locator('[data-terminal="true"]')).wait_for()
    assert run.locator(".agentic-msg__text").inner_text() == "What is (12 + 7) * 3?"
    tool = run.locator(".agentic-tool", has_text="calculate(")
    assert "57" in tool.locator(".agentic-tool__result").inner_text()
    assert "= 57" in run.locator(".agentic-msg--assistant").inner_text()

    # The input is cleared, focused and usable again; the URL names the conversation.
    box = page.get_by_role("textbox", name="Message")
    assert box.input_value() == ""
    assert box.evaluate("element => element === document.activeElement")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    assert re.search(r"/c/[0-9a-f]{32}/$", page.url)
    # The sidebar reloaded on run-update and lists the conversation.
    page.locator("#conversation-list a", has_text="What is (12 + 7) * 3?").wait_for()

    tool.locator("summary").click()
    assert tool.locator("dd pre").first.inner_text() == 'expression="(12 + 7) * 3"'
    screenshot(page, "chat-tool-call")

    send(page, "Convert 10 km to miles")
    page.locator("#turns .agentic-run").nth(1).and_(
        page.locator('[data-terminal="true"]')
    ).wait_for()
    assert "6.21371 mi" in last_run(page).inner_text()
    # Newest message scrolled into view.
    assert last_run(page).locator(".agentic-msg--assistant").is_visible()
    page.wait_for_function(
        "() => { const log = document.getElementById('conversation');"
        " return log.scrollHeight - log.scrollTop - log.clientHeight < 80; }"
    )
    screenshot(page, "chat-conversation")

    # A reload renders the stored conversation the same way.
    page.reload()
    assert page.locator("#turns .agentic-run").count() == 2
    assert "6.21371 mi" in last_run(page).inner_text()


def test_polling_runs_while_working_and_stops_at_the_end(chat, settings, server):
    page = chat
    settings.TASKS = DEFERRED
    polls: list[str] = []
    page.on("request", lambda request: "/fragment/" in request.url and polls.append(request.url))

    send(page, "What time is it?")
    run = last_run(page)
    run.and_(page.locator('[data-status="pending"]')).wait_for()
    assert run.get_by_role("status").inner_text() == "Waiting to start…"
    expect(page.get_by_role("button", name="Send")).to_be_enabled()  # sending interrupts it
    expect(page.locator("#composer-hint")).to_contain_text("sending now stops it")
    page.wait_for_timeout(1500)
    assert polls, "a working run polls its fragment"
    screenshot(page, "chat-pending")

    run_id = run.get_attribute("data-run-id")
    run_in_background(run_id, settings, server)

    run.and_(page.locator('[data-terminal="true"]')).wait_for()
    assert "The current UTC time is" in run.inner_text()
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    seen = len(polls)
    page.wait_for_timeout(3500)  # several polling intervals
    assert len(polls) == seen, "polling stopped once the run finished"


def test_cancel_a_waiting_run(chat, settings):
    page = chat
    settings.TASKS = DEFERRED
    send(page, "Count the words in 'never mind'")
    run = last_run(page)
    run.and_(page.locator('[data-status="pending"]')).wait_for()

    run.get_by_role("button", name="Cancel").click()

    run.and_(page.locator('[data-status="cancelled"]')).wait_for()
    assert "Cancelled." in run.inner_text()
    assert AgentRun.objects.get(pk=run.get_attribute("data-run-id")).status == "cancelled"
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    assert page.get_by_role("textbox", name="Message").evaluate("e => e === document.activeElement")
    screenshot(page, "chat-cancelled")


def test_a_model_error_is_shown_in_place(chat, settings):
    page = chat
    settings.AGENTIC_DJANGO_DEFAULT_AGENT_KEY = "broken"
    send(page, "hello?")

    run = last_run(page)
    run.and_(page.locator('[data-status="failed"]')).wait_for()
    alert = run.get_by_role("alert")
    assert "The agent could not answer." in alert.inner_text()
    assert MODEL_ERROR in alert.inner_text()
    assert PROVIDER_TEXT not in page.content()
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    page.locator("#conversation-list a", has_text="hello?").wait_for()
    screenshot(page, "chat-model-error")


def test_a_rejected_message_shows_the_error_and_keeps_the_text(chat, settings, problems):
    page = chat
    problems.expect_http_error(429)
    settings.AGENTIC_DJANGO_RATE_LIMIT = "1/h"
    send(page, "first")
    last_run(page).and_(page.locator('[data-terminal="true"]')).wait_for()

    send(page, "second")
    error = page.locator("#turns > .agentic-error")
    error.wait_for()
    assert "Too many requests" in error.inner_text()
    assert page.get_by_role("textbox", name="Message").input_value() == "second"
    screenshot(page, "chat-rate-limited")


def test_a_server_error_is_reported_in_a_toast(chat, settings, problems):
    page = chat
    problems.expect_http_error(500)
    settings.AGENTIC_DJANGO_AGENT_REGISTRY = "tests.web.registry.does_not_exist"
    send(page, "hello")

    toast = page.locator("#toast")
    expect(toast).to_be_visible()
    assert "The server is misconfigured" in toast.inner_text()
    assert page.get_by_role("textbox", name="Message").input_value() == "hello"
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    screenshot(page, "chat-server-error")


def test_shift_enter_adds_a_line_and_enter_sends(chat):
    page = chat
    box = page.get_by_role("textbox", name="Message")
    box.press_sequentially("line one")
    box.press("Shift+Enter")
    box.press_sequentially("line two")
    assert box.input_value() == "line one\nline two"
    assert page.locator("#turns .agentic-run").count() == 0

    box.press("Enter")
    last_run(page).and_(page.locator('[data-terminal="true"]')).wait_for()
    assert "line one\nline two" in last_run(page).locator(".agentic-msg--user").inner_text()


def test_log_out_by_post(chat):
    page = chat
    page.get_by_role("button", name="Log out").click()
    page.get_by_role("heading", name="Log in").wait_for()
    page.goto("/")
    assert "/accounts/login/" in page.url
    screenshot(page, "login")
