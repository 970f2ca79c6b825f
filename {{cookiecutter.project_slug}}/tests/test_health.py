import pytest


@pytest.mark.django_db
def test_healthz_reports_database_ok(client):
    response = client.get("/healthz/")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.django_db
def test_chat_requires_login(client, user):
    assert client.get("/").status_code == 302
    client.force_login(user)
    assert client.get("/").status_code == 200


@pytest.mark.django_db
def test_pages_carry_the_project_name(client, settings):
    settings.PROJECT_NAME = "Support Desk"
    assert "<title>Log in · Support Desk</title>" in client.get("/accounts/login/").text
