"""Shared fixtures: the guest assets are built (or taken from the cache) once per session."""

import pytest


@pytest.fixture(scope="session")
def guest_assets():
    from labkit.guest.assets import ensure_assets

    return ensure_assets()
