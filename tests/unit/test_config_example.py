"""config.example.toml is the configuration reference: it must load, and document every key."""

from __future__ import annotations

import re
import typing

import pytest
from pydantic import BaseModel

from smtp2api import config
from smtp2api.config import load_settings
from tests.conftest import REPO

EXAMPLE = REPO / "config.example.toml"


def test_example_loads() -> None:
    settings = load_settings(EXAMPLE, env={})
    assert "main" in settings.providers


def _sections() -> list[tuple[str, type[BaseModel]]]:
    out: list[tuple[str, type[BaseModel]]] = []
    for name, field in config.Settings.model_fields.items():
        annotation = field.annotation
        for arg in (annotation, *typing.get_args(annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                out.append((name, arg))
    return out


SECTION_KEYS = [(section, key) for section, model in _sections() for key in model.model_fields]
PROVIDER_KEYS = [
    (model.model_fields["type"].annotation.__args__[0], key)  # type: ignore[union-attr]
    for model in typing.get_args(typing.get_args(config.ProviderSettings)[0])
    for key in model.model_fields
]


@pytest.mark.parametrize(("section", "key"), SECTION_KEYS)
def test_every_section_key_is_documented(section: str, key: str) -> None:
    text = EXAMPLE.read_text()
    assert re.search(rf"^#? ?{re.escape(key)} =", text, re.MULTILINE), f"[{section}] {key}"


@pytest.mark.parametrize(("provider_type", "key"), PROVIDER_KEYS)
def test_every_provider_key_is_documented(provider_type: str, key: str) -> None:
    text = EXAMPLE.read_text()
    if key in ("timeout", "base_url", "type"):
        assert key in text
        return
    assert re.search(rf"^#? ?{re.escape(key)} =", text, re.MULTILINE), f"{provider_type}.{key}"
