"""Builds a live provider from its settings: the one place that maps ``type`` to a class."""

from __future__ import annotations

import httpx

from smtp2api import config
from smtp2api.errors import ConfigError
from smtp2api.providers.base import Provider


def build_provider(  # noqa: PLR0911 - one return per provider type is this function's job
    name: str, settings: config.ProviderSettings, client: httpx.AsyncClient
) -> Provider:
    """The provider for ``[providers.NAME]``; heavy optional dependencies import lazily here."""
    if isinstance(settings, config.HttpProvider):
        from smtp2api.providers.http import HttpApiProvider

        return HttpApiProvider(name, settings, client)
    if isinstance(settings, config.OutboxProvider):
        from smtp2api.providers.outbox import OutboxProvider

        return OutboxProvider(name, settings)
    if isinstance(settings, config.SesProvider):
        from smtp2api.providers.ses import SesProvider

        return SesProvider(name, settings, client)
    if isinstance(settings, config.MailgunProvider):
        from smtp2api.providers.mailgun import MailgunProvider

        return MailgunProvider(name, settings, client)
    if isinstance(settings, config.SendgridProvider):
        from smtp2api.providers.sendgrid import SendgridProvider

        return SendgridProvider(name, settings, client)
    if isinstance(settings, config.PostmarkProvider):
        from smtp2api.providers.postmark import PostmarkProvider

        return PostmarkProvider(name, settings, client)
    if isinstance(settings, config.ResendProvider):
        from smtp2api.providers.resend import ResendProvider

        return ResendProvider(name, settings, client)
    if isinstance(settings, config.GraphProvider):
        from smtp2api.providers.graph import GraphApiProvider

        return GraphApiProvider(name, settings, client)
    raise ConfigError([f"providers.{name}.type: {settings.type!r} is not available in this build"])
