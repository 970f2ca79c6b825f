"""Benchmarks of agentic_django's own cost, measured against floors in the same process.

Run from the project root (results and analysis: docs/benchmarks.md):

    python -m benchmarks.run_overhead --runs 200   # per run vs bare Runner.run (+ SQLiteSession)
    python -m benchmarks.run_polling --runs 500    # run-fragment / run-detail vs a constant view
    python -m benchmarks.run_events --runs 200     # AGENTIC_DJANGO_ENABLE_EVENTS on vs off
    python -m benchmarks.run_workers --runs 100    # db_worker / rqworker runs/s, 1 and 2 workers

Every script uses ``benchmarks.settings`` (the project's settings, an agent registry backed by
the SDK's ``ScriptedModel``, DEBUG off) and a throwaway database on the server ``DATABASE_URL``
names (an SQLite file by default); no network and no API key are needed.
"""
