"""docs/configuration.md is generated from the config schema and must match it."""

from pathlib import Path

from extauth.configdoc import REGENERATE, missing_descriptions, render

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_every_config_key_has_a_description() -> None:
    assert missing_descriptions() == [], "add description= to these fields in extauth/config.py"


def test_configuration_reference_is_up_to_date() -> None:
    assert DOC.read_text(encoding="utf-8") == render(), f"docs/configuration.md is stale; run: {REGENERATE}"


def test_reference_lists_nested_keys_with_their_defaults() -> None:
    text = render()
    assert "## policies[].jwt" in text and "## abuse" in text
    assert "| `jwks_refresh_seconds` | float | `300` | ≥ 1, ≤ 86400 |" in text
    assert "| `policies` | list of [mapping](#policies) | **required** |" in text
