"""Fixtures of the client's tests: one reward server shared by a test module."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="module")
def rm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The last-character reward model, served: +1 for a text ending in a vowel, else -1."""
    from live import live_server
    from toy_rl import save_last_char_rm

    from service.settings import Settings

    rm = save_last_char_rm(tmp_path_factory.mktemp("last_char_rm"), good="aeiou")
    with live_server(Settings.model_validate({"model": rm})) as live:
        yield live
