"""`make test` first installs the Debian packages its tests need (scripts/system-packages): as
root, or with passwordless sudo, it runs apt-get for the missing ones; otherwise it stops at once
with the command to run. Here dpkg-query, apt-get, id, sudo and service are stand-ins that
record what they were asked to do; nothing is installed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from scripts.bake import TEMPLATE

SCRIPT = TEMPLATE / "scripts/system-packages"
PACKAGES = ["git", "postgresql", "redis-server", "chromium", "chromium-driver"]
RECORD = 'echo "$(basename "$0") $*" >> "$CALLS"\n'
STANDINS = {
    # dpkg-query -W -f='${Status}' PACKAGE: installed when named in $INSTALLED.
    "dpkg-query": 'for last; do :; done\ncase " $INSTALLED " in *" $last "*) '
    'printf "install ok installed"; exit 0;; esac\nexit 1\n',
    "apt-get": RECORD,
    "service": RECORD,
    "id": 'echo "$USER_ID"\n',
    # sudo -n true succeeds only with $PASSWORDLESS; sudo CMD... records and runs CMD.
    "sudo": '[ "$1" = -n ] && { [ -n "$PASSWORDLESS" ]; exit; }\n' + RECORD + 'exec "$@"\n',
}


def system_packages(tmp_path: Path, *, installed: list[str], user_id: int, passwordless=False):
    """Run the script with the stand-ins first on PATH; returns (result, recorded calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STANDINS.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "CALLS": str(calls),
        "INSTALLED": " ".join(installed),
        "USER_ID": str(user_id),
        "PASSWORDLESS": "1" if passwordless else "",
    }
    result = subprocess.run([SCRIPT], env=env, capture_output=True, text=True, timeout=30)
    return result, calls.read_text().splitlines() if calls.exists() else []


def test_nothing_to_do_when_everything_is_installed(tmp_path):
    result, calls = system_packages(tmp_path, installed=PACKAGES, user_id=1000)
    assert (result.returncode, calls, result.stdout + result.stderr) == (0, [], "")


def test_without_root_it_stops_at_once_with_the_command_to_run(tmp_path):
    result, calls = system_packages(tmp_path, installed=["git", "redis-server"], user_id=1000)
    assert result.returncode == 1
    assert calls == [], "nothing may run without root"
    command = (
        "apt-get update && apt-get install -y --no-install-recommends "
        "postgresql chromium chromium-driver"
    )
    assert f'  sudo sh -c "{command}"' in result.stderr.splitlines()


INSTALL = "apt-get install -y -qq --no-install-recommends postgresql chromium-driver"


def test_as_root_it_installs_what_is_missing(tmp_path):
    installed = ["git", "redis-server", "chromium"]
    result, calls = system_packages(tmp_path, installed=installed, user_id=0)
    assert result.returncode == 0, result.stderr
    assert calls == ["apt-get update -qq", INSTALL, "service postgresql stop"]


def test_with_passwordless_sudo_it_installs_what_is_missing(tmp_path):
    installed = ["git", "redis-server", "chromium"]
    result, calls = system_packages(tmp_path, installed=installed, user_id=1000, passwordless=True)
    assert result.returncode == 0, result.stderr
    assert calls == [
        "sudo apt-get update -qq",
        "apt-get update -qq",
        f"sudo env DEBIAN_FRONTEND=noninteractive {INSTALL}",
        INSTALL,
        "sudo service postgresql stop",
        "service postgresql stop",
    ]


def test_make_test_installs_them_before_anything_else():
    # Not as a sub-make of `make test` itself, which would add its own flags and messages.
    env = {k: v for k, v in os.environ.items() if k not in {"MAKELEVEL", "MAKEFLAGS", "MFLAGS"}}
    dry_run = subprocess.run(
        ["make", "--no-print-directory", "-n", "test"],
        cwd=TEMPLATE,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    lines = dry_run.stdout.splitlines()
    assert lines[0] == "scripts/system-packages", dry_run.stdout
    assert any("pytest tests" in line for line in lines[1:])
