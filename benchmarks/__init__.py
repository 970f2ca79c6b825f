"""Benchmarks of agentic_django's own cost, measured against floors in the same process.

They measure a baked project: ``make bench`` (``python -m benchmarks``, see __main__.py) bakes
one, starts throwaway PostgreSQL and Redis servers and runs each script inside it. Results and
analysis: docs/benchmarks.md. In a project baked with ``--workdir``, one script at a time:

    PYTHONPATH=<template> python -m benchmarks.run_overhead --runs 200  # vs bare Runner.run
    PYTHONPATH=<template> python -m benchmarks.run_polling --runs 500   # polled views vs a floor
    PYTHONPATH=<template> python -m benchmarks.run_events --runs 200    # events on vs off
    PYTHONPATH=<template> python -m benchmarks.run_workers --runs 100   # workers' runs/s
    PYTHONPATH=<template> python -m benchmarks.compare_reference        # vs agentic-django 0.5.1

Every script uses ``benchmarks.settings`` (the project's settings, an agent registry backed by
the SDK's ``ScriptedModel``, DEBUG off) and a throwaway database on the server ``DATABASE_URL``
names (an SQLite file by default); no network and no API key are needed (``compare_reference``
installs the reference package from PyPI once). The scripts import only the project (its
settings and ``agentic_django``), never the template's own code.
"""
