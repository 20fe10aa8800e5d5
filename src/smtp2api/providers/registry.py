"""Builds a live provider from its settings: the one place that maps ``type`` to a class."""

from __future__ import annotations

import httpx

from smtp2api import config
from smtp2api.errors import ConfigError
from smtp2api.providers.base import Provider


def build_provider(
    name: str, settings: config.ProviderSettings, client: httpx.AsyncClient
) -> Provider:
    """The provider for ``[providers.NAME]``; heavy optional dependencies import lazily here."""
    if isinstance(settings, config.HttpProvider):
        from smtp2api.providers.http import HttpApiProvider

        return HttpApiProvider(name, settings, client)
    if isinstance(settings, config.OutboxProvider):
        from smtp2api.providers.outbox import OutboxProvider

        return OutboxProvider(name, settings)
    raise ConfigError([f"providers.{name}.type: {settings.type!r} is not available in this build"])
