"""Approving and rejecting an agent's tool call from the chat, in Chromium."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from chat.models import TeamNote
from tests.browser.conftest import last_run, screenshot, send

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_approve_a_note_from_the_chat(chat):
    page = chat
    send(page, "Send a note to the team: the demo works")
    run = last_run(page)
    run.and_(page.locator('[data-status="awaiting_approval"]')).wait_for()
    approvals = run.locator(".agentic-approvals")
    expect(approvals).to_contain_text("send_team_note")
    expect(approvals).to_contain_text("the demo works")
    assert not TeamNote.objects.exists()
    screenshot(page, "chat-approval-pending")

    approvals.get_by_role("button", name="Approve").click()
    run.and_(page.locator('[data-status="completed"]')).wait_for()
    expect(run).to_contain_text("Note sent to the team: the demo works")
    assert list(TeamNote.objects.values_list("text", flat=True)) == ["the demo works"]
    screenshot(page, "chat-approval-approved")


def test_reject_with_a_reason_from_the_chat(chat):
    page = chat
    send(page, "Tell the team that lunch is at noon")
    run = last_run(page)
    run.and_(page.locator('[data-status="awaiting_approval"]')).wait_for()
    run.get_by_label("Reason for rejecting send_team_note").fill("Lunch moved to one.")
    run.get_by_role("button", name="Reject").click()
    run.and_(page.locator('[data-status="completed"]')).wait_for()
    expect(run).to_contain_text("The note was not sent: Lunch moved to one.")
    assert not TeamNote.objects.exists()
    screenshot(page, "chat-approval-rejected")
