"""Every file that holds a secret is readable by its owner only from the moment it exists: created 0600, never
written readable and then ``chmod``-ed (another user could open it in between and keep the descriptor).

Each writer runs under a umask of 0, with an audit hook recording every chmod: a file created private needs none,
and under that umask only a file created 0600 ends 0600 without one."""

from __future__ import annotations

import os
import stat
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from scim_pipeline.config import write_dotenv
from scim_pipeline.devstack.emulator import tls
from scim_pipeline.devstack.emulator.server import SECRETS_FILE, load_webhook_secret
from scim_pipeline_tests.emulator_support import seed_tls

_chmods: list | None = None


def _audit(event: str, args: tuple) -> None:
    if _chmods is not None and event == "os.chmod":
        _chmods.append(args)


sys.addaudithook(_audit)


@contextmanager
def permissive_umask_recording_chmods():
    global _chmods
    previous = os.umask(0)
    _chmods = []
    try:
        yield _chmods
    finally:
        os.umask(previous)
        _chmods = None


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def dotenv(home: Path) -> list[Path]:
    write_dotenv(home / "app.env", {"SCIM_PIPELINE_APP_SECRET": "whsec_c2VjcmV0"})
    return [home / "app.env"]


def tls_key(home: Path) -> list[Path]:
    return [tls.ensure_tls_material(home).server_key]


def webhook_secret(home: Path) -> list[Path]:
    load_webhook_secret(home)
    return [home / SECRETS_FILE]


def seeded_tls_key(home: Path) -> list[Path]:
    seed_tls(home)  # the test suite's own copy of the emulator's key into a home
    return [home / "tls" / "emulator-server-key.pem"]


WRITERS = [dotenv, tls_key, webhook_secret, seeded_tls_key]


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.__name__)
def test_a_secret_file_is_created_private(writer, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    with permissive_umask_recording_chmods() as chmods:
        paths = writer(home)
    for path in paths:
        assert mode(path) == 0o600, f"{path.name} is {oct(mode(path))}"
    assert chmods == [], f"{writer.__name__} changed a mode after creating a file: {chmods}"


@pytest.mark.parametrize("writer", [dotenv, tls_key, webhook_secret], ids=lambda w: w.__name__)
def test_a_secret_file_replacing_a_readable_one_is_private(writer, tmp_path):
    """An earlier version may have left the file readable by others: what replaces it is private all the same."""
    home = tmp_path / "home"
    home.mkdir()
    for path in writer(home):
        path.write_text("unusable\n")
        path.chmod(0o644)
    with permissive_umask_recording_chmods() as chmods:
        paths = writer(home)
    for path in paths:
        assert mode(path) == 0o600, f"{path.name} is {oct(mode(path))}"
        assert path.read_text() != "unusable\n"
    assert chmods == []
