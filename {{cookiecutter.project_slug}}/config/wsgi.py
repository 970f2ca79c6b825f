import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
application = get_wsgi_application()

# Import (and warm up) the Agents SDK and the agent registry now, not on the first request.
from agentic_django.workers import preload  # noqa: E402

preload()
