"""The chat on a phone: nothing scrolls sideways from 360 to 414 px wide, and the controls
(Send, Cancel, New chat) are on screen."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from agentic_django.execution import execute
from agentic_django.models import AgentRun
from tests.browser.conftest import DEFERRED, last_run, screenshot, send
from tests.browser.registry import LONG_WORD
from tests.waiting import PATIENCE, in_thread

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PHONE_WIDTHS = (360, 390, 414)

# What sticks out past the screen's edges or scrolls sideways. Code blocks and tables may
# scroll inside themselves (what is in them is not checked); nothing else may.
OVERFLOW = """() => {
  const found = [];
  const page = document.scrollingElement;
  if (page.scrollWidth > window.innerWidth) found.push(`the page: ${page.scrollWidth}px`);
  for (const element of document.querySelectorAll("body *")) {
    if (element.parentElement.closest("pre, table")) continue;
    const style = getComputedStyle(element);
    if (style.display === "none" || style.position === "fixed") continue;
    const name = `${element.tagName.toLowerCase()}.${element.className}`;
    const scrolls = ["auto", "scroll"].includes(style.overflowX) && !element.matches("pre, table");
    if (scrolls && element.scrollWidth > element.clientWidth + 1) {
      found.push(`${name} scrolls sideways`);
    }
    const box = element.getBoundingClientRect();
    if (box.width && (box.left < -1 || box.right > window.innerWidth + 1)) {
      found.push(`${name} spans ${box.left}..${box.right}`);
    }
  }
  return found;
}"""
SCROLLS_SIDEWAYS = """element => ["auto", "scroll"].includes(getComputedStyle(element).overflowX)
  && element.scrollWidth > element.clientWidth"""


def assert_on_screen(page, locator) -> None:
    expect(locator).to_be_visible()
    box = locator.bounding_box()
    viewport = page.viewport_size
    assert box is not None
    assert box["x"] >= 0 and box["y"] >= 0, box
    assert box["x"] + box["width"] <= viewport["width"], (box, viewport)
    assert box["y"] + box["height"] <= viewport["height"], (box, viewport)


def test_a_wide_reply_does_not_scroll_sideways_on_a_phone(chat, settings):
    page = chat
    settings.AGENTIC_DJANGO_DEFAULT_AGENT_KEY = "wide"
    send(page, f"Please check {LONG_WORD} for me")
    run = last_run(page)
    run.and_(page.locator('[data-terminal="true"]')).wait_for()
    run.locator(".agentic-tool summary").click()  # the tool call's details are wide too
    code, table = run.locator(".agentic-markdown pre"), run.locator(".agentic-markdown table")

    for width in PHONE_WIDTHS:
        page.set_viewport_size({"width": width, "height": 844})
        overflowing = page.evaluate(OVERFLOW)
        assert overflowing == [], "\n".join([f"at {width} px:", *overflowing])
        # The code's long line and the wide table scroll inside their own boxes.
        assert code.evaluate(SCROLLS_SIDEWAYS), f"at {width} px"
        assert table.evaluate(SCROLLS_SIDEWAYS), f"at {width} px"
        code.scroll_into_view_if_needed()
        screenshot(page, f"phone-{width}-wide-reply")


def test_send_cancel_and_new_chat_are_on_screen_at_390_x_844(chat, settings):
    page = chat
    page.set_viewport_size({"width": 390, "height": 844})
    settings.TASKS = DEFERRED
    send(page, f"What time is it? {LONG_WORD}")
    run = last_run(page)
    run.and_(page.locator('[data-status="pending"]')).wait_for()

    assert_on_screen(page, page.get_by_role("button", name="Send"))
    assert_on_screen(page, run.get_by_role("button", name="Cancel"))
    assert_on_screen(page, page.get_by_role("link", name="New chat"))
    assert page.evaluate(OVERFLOW) == []
    screenshot(page, "phone-390x844")


def test_an_approval_comes_into_view_and_the_conversations_fold_away_at_390_x_844(
    chat, chat_user, settings
):
    page = chat
    page.set_viewport_size({"width": 390, "height": 844})
    send(page, f"Please check {LONG_WORD} for me")
    last_run(page).and_(page.locator('[data-terminal="true"]')).wait_for()
    settings.TASKS = DEFERRED  # the run starts once the reader has scrolled back up
    send(page, "Send a note to the team: the demo works")
    run = last_run(page)
    run.and_(page.locator('[data-status="pending"]')).wait_for()
    page.locator("#conversation").evaluate("log => log.scrollTo({top: 0, behavior: 'instant'})")
    pending = AgentRun.objects.get(owner=chat_user, status="pending")
    worker = in_thread(lambda: execute(str(pending.pk), task_id="worker"))

    run.and_(page.locator('[data-status="awaiting_approval"]')).wait_for()
    expect(run.get_by_role("button", name="Approve")).to_be_in_viewport(ratio=1)
    expect(run.get_by_role("button", name="Reject")).to_be_in_viewport(ratio=1)
    screenshot(page, "phone-390x844-approval")
    worker.join(PATIENCE)

    # The conversation list is folded away on the phone until asked for, and open on a desk.
    conversations = page.get_by_role("navigation", name="Conversations")
    expect(conversations).to_be_hidden()
    page.get_by_role("button", name="Show conversations").click()
    expect(conversations.get_by_role("link").first).to_be_visible()
    assert page.evaluate(OVERFLOW) == []
    screenshot(page, "phone-390x844-conversations")
    page.get_by_role("button", name="Hide conversations").click()
    expect(conversations).to_be_hidden()
    page.set_viewport_size({"width": 1280, "height": 860})
    expect(conversations.get_by_role("link").first).to_be_visible()
    expect(page.get_by_role("button", name="Show conversations")).to_be_hidden()
