"""``manage.py agentic_django_usage``: the ledger summed per user, model and day (or as asked),
as a table or as CSV, over the budget period or the dates given."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from io import StringIO
from itertools import count
from zoneinfo import ZoneInfo

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from agentic_django.models import AgentRun, AgentUsage

pytestmark = pytest.mark.django_db

PARIS = ZoneInfo("Europe/Paris")
HEADER = (
    "calls,input_tokens,output_tokens,cached_tokens,reasoning_tokens,total_tokens,cost,"
    "unpriced_calls"
)
_sequence = count(1)


def usage_row(
    run: AgentRun,
    at: datetime,
    model: str,
    tokens: tuple[int, int],
    cost: str | None,
    **fields: object,
) -> AgentUsage:
    """One ledger row of ``run``, as the engine writes it (tokens: input, output)."""
    sequence = next(_sequence)
    return AgentUsage.objects.create(
        run=run,
        sequence=sequence,
        attempt=1,
        turn=sequence,
        owner_id=run.owner_id,
        session_id=run.session_id,
        agent_name=fields.pop("agent_name", "assistant"),
        model=model,
        provider=fields.pop("provider", "openai"),
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        total_tokens=sum(tokens),
        cost=None if cost is None else Decimal(cost),
        price_source="" if cost is None else "genai-prices",
        priced_at=at,
        created_at=at,
        **fields,
    )


def paris(day: int, hour: int, month: int = 3) -> datetime:
    return datetime(2025, month, day, hour, 30, tzinfo=PARIS)


@pytest.fixture
def ledger(settings, user, other_user, make_run):
    """Calls of two users on two models over 1 and 2 March 2025 (Paris time), and one call
    before and one after those days."""
    settings.TIME_ZONE = "Europe/Paris"
    alice = make_run(user)
    mallory = make_run(other_user, session_key="m")
    usage_row(alice, paris(1, 10), "gpt-4.1", (100, 20), "0.0012", cached_tokens=10)
    usage_row(alice, paris(1, 11), "gpt-4.1", (200, 30), "0.0023", reasoning_tokens=5)
    # 23:30 UTC on 1 March: already 2 March in Paris. No known price.
    usage_row(alice, paris(2, 0), "local-llm", (50, 10), None, provider="localhost")
    usage_row(mallory, paris(2, 9), "gpt-4.1", (1000, 500), "0.015")
    usage_row(mallory, paris(28, 23, month=2), "gpt-4.1", (7, 7), "1")
    usage_row(alice, paris(3, 0), "gpt-4.1", (7, 7), "1")
    return {"alice": alice, "mallory": mallory}


def report(*args: str) -> str:
    out = StringIO()
    call_command("agentic_django_usage", *args, stdout=out)
    return out.getvalue()


MARCH_1_2 = ("--since", "2025-03-01", "--until", "2025-03-02")


def test_csv_groups_per_user_model_and_local_day_with_exact_costs(ledger):
    assert report(*MARCH_1_2, "--csv").splitlines() == [
        f"user,model,day,{HEADER}",
        "alice,gpt-4.1,2025-03-01,2,300,50,10,5,350,0.0035,0",
        "alice,local-llm,2025-03-02,1,50,10,0,0,60,,1",
        "mallory,gpt-4.1,2025-03-02,1,1000,500,0,0,1500,0.015,0",
    ]


def test_the_table_shows_unknown_costs_and_a_total_line(ledger):
    assert report(*MARCH_1_2).splitlines() == [
        "Model usage from 2025-03-01 to 2025-03-02, by user, model, day (costs in US dollars):",
        "user     model      day         calls  input tokens  output tokens  cached tokens"
        "  reasoning tokens  total tokens     cost  unpriced calls",
        "-------  ---------  ----------  -----  ------------  -------------  -------------"
        "  ----------------  ------------  -------  --------------",
        "alice    gpt-4.1    2025-03-01      2           300             50             10"
        "                 5           350   0.0035               0",
        "alice    local-llm  2025-03-02      1            50             10              0"
        "                 0            60  unknown               1",
        "mallory  gpt-4.1    2025-03-02      1         1,000            500              0"
        "                 0         1,500    0.015               0",
        "-------  ---------  ----------  -----  ------------  -------------  -------------"
        "  ----------------  ------------  -------  --------------",
        "total                               4         1,350            560             10"
        "                 5         1,910   0.0185               1",
    ]


def test_any_grouping_can_be_chosen(ledger):
    assert report(*MARCH_1_2, "--csv", "--by", "provider,agent").splitlines() == [
        f"provider,agent,{HEADER}",
        "localhost,assistant,1,50,10,0,0,60,,1",
        "openai,assistant,3,1300,550,10,5,1850,0.0185,0",
    ]
    runs = report(*MARCH_1_2, "--csv", "--by", "run").splitlines()
    assert runs[1:] == sorted(
        [
            f"{ledger['alice'].pk},3,350,60,10,5,410,0.0035,1",
            f"{ledger['mallory'].pk},1,1000,500,0,0,1500,0.015,0",
        ]
    )


def test_one_user_by_name_or_id(ledger, user, other_user):
    by_name = report(*MARCH_1_2, "--csv", "--by", "model", "--user", "mallory")
    assert by_name.splitlines() == [f"model,{HEADER}", "gpt-4.1,1,1000,500,0,0,1500,0.015,0"]
    by_id = report(*MARCH_1_2, "--csv", "--by", "user", "--user", str(user.pk))
    assert by_id.splitlines() == [f"user,{HEADER}", "alice,3,350,60,10,5,410,0.0035,1"]


def test_since_and_until_are_whole_local_days_either_side_open(ledger):
    since = report("--since", "2025-03-02", "--csv", "--by", "day").splitlines()
    assert since == [
        f"day,{HEADER}",
        "2025-03-02,2,1050,510,0,0,1560,0.015,1",
        "2025-03-03,1,7,7,0,0,14,1,0",
    ]
    until = report("--until", "2025-03-01", "--csv", "--by", "day").splitlines()
    assert until == [
        f"day,{HEADER}",
        "2025-02-28,1,7,7,0,0,14,1,0",
        "2025-03-01,2,300,50,10,5,350,0.0035,0",
    ]
    assert report("--until", "2025-03-01", "--by", "day").startswith(
        "Model usage up to 2025-03-01, by day"
    )


def test_the_default_is_the_budget_period_in_progress(settings, user, make_run):
    settings.AGENTIC_DJANGO_BUDGETS = {"period": "day"}
    run = make_run(user)
    now = timezone.now()
    usage_row(run, now, "gpt-4.1", (10, 5), "0.5")
    usage_row(run, now - timedelta(days=2), "gpt-4.1", (10, 5), "0.5")
    today = timezone.localdate().isoformat()
    assert report("--csv").splitlines() == [
        f"user,model,day,{HEADER}",
        f"alice,gpt-4.1,{today},1,10,5,0,0,15,0.5,0",
    ]
    assert report("--days", "3", "--csv", "--by", "user").splitlines()[1:] == [
        "alice,2,20,10,0,0,30,1,0"
    ]
    assert report("--days", "1").startswith(f"Model usage from {today} to {today}, by user")


def test_no_calls_says_so(db):
    assert report(*MARCH_1_2) == "No model calls from 2025-03-01 to 2025-03-02.\n"
    assert report(*MARCH_1_2, "--csv") == f"user,model,day,{HEADER}\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--since", "2025-02-30"), "--since: expected a date as YYYY-MM-DD, got '2025-02-30'"),
        (("--until", "yesterday"), "--until: expected a date as YYYY-MM-DD"),
        (("--since", "2025-03-05", "--until", "2025-03-01"), "is after --until"),
        (("--days", "0"), "--days: expected a whole number of days"),
        (("--days", "2", "--since", "2025-03-01"), "either --days or --since/--until"),
        (("--by", "user,colour"), "--by: expected distinct names among user, agent"),
        (("--by", "user,user"), "--by: expected distinct names"),
        (("--user", "nobody"), "No user with the username or id 'nobody'"),
        (("--days", "99999999"), "out of range"),
        (("--until", "9999-12-31"), "out of range"),
    ],
)
def test_bad_input_is_a_clear_command_error(db, args, message):
    with pytest.raises(CommandError) as error:
        report(*args)
    assert message in str(error.value)
