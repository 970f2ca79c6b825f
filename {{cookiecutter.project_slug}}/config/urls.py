from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from config.health import healthz, readyz

# A 503 (not a 500) when the database is unreachable, even if other middleware hit it first.
handler500 = "agentic_django.middleware.server_error"
# The app's endpoints answer a request Django refuses to read (too many fields) as JSON.
handler400 = "agentic_django.middleware.bad_request"

urlpatterns = [
    path("", include("chat.urls")),
    path("agents/", include("agentic_django.urls")),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("healthz/", healthz, name="healthz"),
    path("readyz/", readyz, name="readyz"),
]
