"""Which providers a message takes: the first ``[[routes]]`` entry matching account and sender."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from smtp2api.config import Route
from smtp2api.policy import address_matches


@dataclass(frozen=True, slots=True)
class RouteMatch:
    index: int
    providers: tuple[str, ...]


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = tuple(routes)

    def select(self, account: str | None, mail_from: str) -> RouteMatch | None:
        """The first route whose match keys all hold; a route without keys matches all."""
        for index, route in enumerate(self._routes):
            if route.accounts and account not in route.accounts:
                continue
            if route.senders and not address_matches(mail_from, route.senders):
                continue
            return RouteMatch(index, tuple(route.providers))
        return None
