"""Create (or reset) a demo login with a fresh random password and print how to log in."""

from __future__ import annotations

import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction
from django.urls import reverse


class Command(BaseCommand):
    help = "Create or reset the demo user with a new random password and print the login URL."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--username", default="demo", help="Username (default: demo).")
        parser.add_argument(
            "--base-url",
            default="http://127.0.0.1:8000",
            help="Where the site is served, for the printed login URL.",
        )

    def handle(self, *args: Any, username: str, base_url: str, **options: Any) -> None:
        password = secrets.token_urlsafe(12)
        user_model = get_user_model()
        with transaction.atomic():
            user, created = user_model._default_manager.get_or_create(
                **{user_model.USERNAME_FIELD: username}
            )
            user.set_password(password)
            user.is_active = True
            user.save()
        login_url = base_url.rstrip("/") + reverse("login")
        verb = "Created" if created else "Reset"
        self.stdout.write(self.style.SUCCESS(f"{verb} the demo user."))
        self.stdout.write(f"  Log in at: {login_url}")
        self.stdout.write(f"  Username:  {username}")
        self.stdout.write(f"  Password:  {password}")
