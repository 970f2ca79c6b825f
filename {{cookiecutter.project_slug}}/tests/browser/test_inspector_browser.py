"""The run inspector in a real browser: from a reply's "Details" to the timeline of what the
agent did, a step opened to what it recorded, on a desktop and on a phone (no sideways
scrolling, no CSP violation: the bars are SVG attributes, not inline styles)."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import last_run, screenshot, send

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_a_replys_details_show_each_step_to_scale(chat):
    page = chat
    send(page, "What is (12 + 7) * 3?")
    run = last_run(page)
    run.and_(page.locator('[data-terminal="true"]')).wait_for()

    run.get_by_role("link", name=re.compile("Details")).click()

    page.get_by_role("heading", name="What the agent did").wait_for()
    expect(page.locator(".agentic-trace")).to_have_count(1)
    expect(page.locator(".agentic-trace__title")).to_contain_text("Attempt 1")
    tool = page.locator(".agentic-span--function").first
    expect(tool).to_contain_text("calculate")
    bars = page.locator(".agentic-span__bar rect")
    assert bars.count() >= 4
    assert all(float(bars.nth(i).get_attribute("width")) > 0 for i in range(bars.count()))
    tool.locator("summary").click()
    expect(tool.locator(".agentic-span__detail")).to_be_visible()
    expect(tool.locator(".agentic-span__detail")).to_contain_text('"output"')
    screenshot(page, "inspector-1280")

    page.set_viewport_size({"width": 390, "height": 844})
    expect(tool.locator(".agentic-span__detail")).to_be_visible()
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0
    screenshot(page, "inspector-390")

    page.get_by_role("link", name="← Back").click()
    page.wait_for_url(re.compile(r"/c/"))
