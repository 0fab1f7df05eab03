"""Presets and --set overrides."""

from __future__ import annotations

import pytest

from sim.policies.presets import PRESETS, build_policy, parse_overrides
from traces.errors import UserError

REQUIRED = ("lod", "lru", "mixtral-offloading", "eap", "fate", "speculate", "cpu-exec", "oracle")


def test_required_presets_exist_and_cite_a_source() -> None:
    for name in REQUIRED:
        policy = build_policy(name)
        assert policy.source and policy.description


def test_overrides_change_components_and_parameters() -> None:
    p = build_policy("fate", {"eviction": "lru", "int2_rate": "0.5", "cancel_stale": "false", "lookahead": "2"})
    assert (p.eviction, p.int2_rate, p.cancel_stale, p.lookahead) == ("lru", 0.5, False, 2)
    assert build_policy("fate").eviction == "arc"  # presets are not mutated


@pytest.mark.parametrize("overrides, message", [
    ({"evict": "lru"}, "unknown key; valid keys are allocation, eviction"),
    ({"eviction": "fifo"}, "choose one of lru, lfu, arc, belady, none"),
    ({"int2_rate": "1.5"}, r"must be a number in \[0, 1\]"),
    ({"lookahead": "x"}, "must be an integer"),
    ({"miss_precision": "bf16"}, "choose one of int8, int4, int2"),
])
def test_bad_overrides_are_refused_with_the_choices(overrides: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_policy("fate", overrides)


def test_unknown_policy_lists_the_presets() -> None:
    with pytest.raises(UserError, match="choose one of " + ", ".join(PRESETS)):
        build_policy("fat")


def test_parse_overrides() -> None:
    assert parse_overrides(["a=1", "b = x"]) == {"a": "1", "b": "x"}
    for bad in (["a"], ["=1"], ["a="]):
        with pytest.raises(UserError, match="write key=value"):
            parse_overrides(bad)
