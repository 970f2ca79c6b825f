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
