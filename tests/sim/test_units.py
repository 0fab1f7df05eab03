"""Sizes and budgets as users write them."""

import pytest

from sim.modelspec import get_model_spec
from sim.units import format_bytes, parse_budget, parse_size
from traces.errors import UserError


@pytest.mark.parametrize("text, expected", [
    ("6GiB", 6 * 2**30), ("512MB", 512 * 10**6), ("4096", 4096), ("1.5e9", 1_500_000_000),
    ("2 kib", 2048), ("3GB", 3 * 10**9), ("10b", 10),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "six GiB", "5 parsecs", "1..2GB"])
def test_bad_sizes_are_one_line_user_errors(text):
    with pytest.raises(UserError, match="cannot read size"):
        parse_size(text)


def test_percentage_budget_is_resident_bytes_plus_that_share_of_the_experts():
    spec = get_model_spec("qwen1.5-moe-a2.7b")
    assert parse_budget("0%", spec, kv_tokens=100) == spec.resident_bytes(100)
    assert parse_budget("25%", spec) == spec.resident_bytes(0) + spec.routed_expert_bytes_total() // 4
    assert parse_budget("100%", spec) == spec.resident_bytes(0) + spec.routed_expert_bytes_total()


def test_bad_budgets():
    spec = get_model_spec("qwen1.5-moe-a2.7b")
    with pytest.raises(UserError, match="outside 0%..100%"):
        parse_budget("150%", spec)
    with pytest.raises(UserError, match="percentage"):
        parse_budget("x%", spec)
    with pytest.raises(UserError, match="more than 0 bytes"):
        parse_budget("0GB", spec)


def test_format_bytes():
    assert format_bytes(1536) == "1.50 KiB" and format_bytes(12) == "12 B"
