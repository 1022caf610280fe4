"""The Lua scripts ship as package data, every one is loaded, and every one compiles."""

from __future__ import annotations

from importlib import resources

import redis

from masactrl_jobs.store.scripts import SCRIPTS


def test_every_lua_file_is_loaded() -> None:
    folder = resources.files("masactrl_jobs.store") / "lua"
    files = {entry.name.removesuffix(".lua") for entry in folder.iterdir()}
    assert files == set(SCRIPTS) | {"prelude"}


def test_every_script_compiles(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        for name, source in SCRIPTS.items():
            assert client.script_load(source), name
    finally:
        client.close()
