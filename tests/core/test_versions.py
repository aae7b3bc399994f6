"""Adapter version names are never reused and old versions are unloaded only when idle."""

import pytest

from areal_core.errors import ArealError
from areal_core.versions import AdapterVersions, live_versions_needed


def load(versions, v):
    name = versions.reserve(v)
    versions.confirm(v)
    return name


def test_names_follow_the_format_and_are_never_reused():
    versions = AdapterVersions("lora", window=1)
    assert load(versions, 0) == "lora-v0"
    assert load(versions, 1) == "lora-v1"
    with pytest.raises(ArealError, match="never reused"):
        versions.reserve(1)
    versions.forget("lora-v0")
    with pytest.raises(ArealError, match="never reused"):
        versions.reserve(0)


def test_versions_never_go_back():
    versions = AdapterVersions("lora", window=0)
    load(versions, 5)
    with pytest.raises(ArealError, match="not newer"):
        versions.reserve(4)


def test_names_held_by_a_server_are_not_reused_after_a_resume():
    versions = AdapterVersions("lora", window=0)
    versions.adopt_existing(["lora-v3"])
    with pytest.raises(ArealError):
        versions.reserve(3)
    assert versions.reserve(4) == "lora-v4"


def test_stale_versions_wait_for_requests_in_flight():
    versions = AdapterVersions("lora", window=1)
    for v in range(3):
        load(versions, v)
    versions.acquire(0)
    assert versions.stale() == []  # v0 is outside the window but still in use
    versions.release(0)
    assert versions.stale() == ["lora-v0"]
    versions.forget("lora-v0")
    assert versions.loaded() == {1: "lora-v1", 2: "lora-v2"}


def test_acquire_refuses_an_unloaded_version():
    versions = AdapterVersions("lora", window=0)
    with pytest.raises(ArealError, match="not loaded"):
        versions.acquire(0)


def test_live_versions_cover_window_and_the_one_loading():
    assert live_versions_needed(0) == 2 and live_versions_needed(2) == 4
