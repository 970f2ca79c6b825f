from django.urls import path

from chat import views

app_name = "chat"
urlpatterns = [
    path("", views.index, name="index"),
    path("c/<str:session_key>/", views.conversation, name="conversation"),
    path("conversations/", views.conversation_list, name="conversation-list"),
]
