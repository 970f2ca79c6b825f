from django.contrib import admin

from chat.models import TeamNote


@admin.register(TeamNote)
class TeamNoteAdmin(admin.ModelAdmin):
    list_display = ("text", "author", "created_at")
    raw_id_fields = ("author",)
    readonly_fields = ("author", "text", "idempotency_key", "created_at")
