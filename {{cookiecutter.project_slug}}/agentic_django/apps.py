from django.apps import AppConfig


class AgenticDjangoConfig(AppConfig):
    name = "agentic_django"
    verbose_name = "Agentic Django"
    default_auto_field = "django.db.models.BigAutoField"
