"""Pricing modifiers of a request's raw usage as event metadata: only the non-default ones, as strings."""

from __future__ import annotations

import pytest

from gateway.modifiers import DEFAULTS, FIELDS, modifiers


def test_non_default_values_are_kept_in_field_order() -> None:
    assert FIELDS == ("service_tier", "speed", "inference_geo")
    assert modifiers(["priority", "fast", "us"]) == (
        ("service_tier", "priority"),
        ("speed", "fast"),
        ("inference_geo", "us"),
    )
    assert modifiers(["batch", None, None]) == (("service_tier", "batch"),)


@pytest.mark.parametrize(
    "values",
    [
        [None, None, None],  # absent (a stored request without them, or a Gemini one)
        ["standard", "standard", "global"],  # the defaults
        ["", "", ""],  # Polar refuses empty strings, and they say nothing
        [1, True, {"a": "fast"}],  # not strings
    ],
)
def test_absent_default_and_odd_values_add_nothing(values: list[object]) -> None:
    assert modifiers(values) == ()


def test_keys_fit_polar_metadata_keys() -> None:
    assert all(1 <= len(k) <= 40 for k in DEFAULTS)


def test_a_row_with_the_wrong_number_of_fields_is_a_bug_not_silence() -> None:
    with pytest.raises(ValueError):
        modifiers(["fast"])
