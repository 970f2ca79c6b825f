"""Settings of the web processes tests/web/test_web_process.py starts: the project's (as
tests/web/live.py's), serving static files without collectstatic, and with the task backend
AGENTIC_TEST_TASK_BACKEND names, when it names one."""

import os

from tests.web.live_settings import *  # noqa: F403

STORAGES = {
    **STORAGES,  # noqa: F405
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
if os.environ.get("AGENTIC_TEST_TASK_BACKEND"):
    TASKS = {"default": {"BACKEND": os.environ["AGENTIC_TEST_TASK_BACKEND"]}}
