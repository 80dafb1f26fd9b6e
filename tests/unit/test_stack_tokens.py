"""The local stack's API tokens file is private from the moment it exists."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gpumeter.stack import load_tokens


def test_the_token_file_is_created_private_not_restricted_afterwards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a permissive umask, and no chmod at all (a restriction made after the write would be
    # too late: the file was readable in between)
    old_umask = os.umask(0o022)
    monkeypatch.setattr(Path, "chmod", lambda self, mode: None)
    monkeypatch.setattr(os, "chmod", lambda *args, **kwargs: None)
    try:
        admin, billing = load_tokens(tmp_path / "api-tokens.json")
    finally:
        os.umask(old_umask)

    # Then only its owner may read it, and a second start reads the same tokens back
    mode = stat.S_IMODE((tmp_path / "api-tokens.json").stat().st_mode)
    assert mode == 0o600, oct(mode)
    assert len(admin) >= 32 and len(billing) >= 32 and admin != billing
    assert load_tokens(tmp_path / "api-tokens.json") == (admin, billing)


def test_tokens_an_older_run_made_too_short_are_replaced(tmp_path: Path) -> None:
    # An older stack wrote 24-character tokens, which the services now refuse
    path = tmp_path / "api-tokens.json"
    path.write_text(json.dumps({"admin": "a" * 24, "billing": "b" * 24}))
    admin, billing = load_tokens(path)
    assert len(admin) >= 32 and len(billing) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"admin": admin, "billing": billing}
