"""`fatesim reproduce`: exact-length prompts, the trace cache, the figure arithmetic on hand-made grids, the
fit's solver, contexts for the speculate table, and bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from sim import paper_traces, reproduce
from sim.cli import main
from sim.costs import CostModel
from sim.hardware import EngineOverheads, load_profile
from sim.modelspec import get_model_spec
from sim.papers import FATE_FIGURES, FIT_TARGETS
from sim.reproduce import REFERENCE_GB, Grid, GridRun, fate_rows, format_fate
from sim.reproduce_fit import fit_log_parameters
from sim.reproduce_tables import at_context
from sim.synthetic import synthetic_trace
from traces.errors import UserError

Q, D = "qwen1.5-moe-a2.7b", "deepseek-moe-16b"


class WordTokenizer:
    """Whitespace 'tokenizer': one id per word, decode joins with spaces (round-trips exactly)."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": [len(w) for w in text.split()]}

    def decode(self, ids: list[int]) -> str:
        return " ".join("x" * i for i in ids)


def test_exact_prompts_have_exactly_n_tokens_and_do_not_overlap() -> None:
    text = " ".join("y" * (1 + i % 5) for i in range(100))
    prompts = paper_traces.exact_prompts(WordTokenizer(), 30, 3, text)
    assert [len(p.split()) for p in prompts] == [30, 30, 30]
    assert [len(w) for w in prompts[1].split()][:3] == [1 + 30 % 5, 1 + 31 % 5, 1 + 32 % 5]  # window 1 starts at 30


def test_exact_prompts_refuse_short_text_and_unstable_tokenizers() -> None:
    with pytest.raises(UserError, match="fewer than 4 prompts of 30"):
        paper_traces.exact_prompts(WordTokenizer(), 30, 4, "a " * 100)

    class Merging(WordTokenizer):
        def decode(self, ids: list[int]) -> str:
            return "".join("x" * i for i in ids)  # words glued: re-tokenizes to one token

    with pytest.raises(UserError, match="re-tokenizes to 1"):
        paper_traces.exact_prompts(Merging(), 3, 1, "a b c d")


def test_trace_key_depends_on_every_count() -> None:
    base = paper_traces.trace_key("mini-qwen-moe", 512, 4, 32)
    assert base == paper_traces.trace_key("mini-qwen-moe", 512, 4, 32)
    others = {paper_traces.trace_key("mini-qwen-moe", 256, 4, 32), paper_traces.trace_key("mini-qwen-moe", 512, 3, 32),
              paper_traces.trace_key("mini-qwen-moe", 512, 4, 33), paper_traces.trace_key("mini-deepseek-moe", 512, 4, 32)}
    assert base not in others and len(others) == 4


def test_cached_trace_is_returned_without_recording(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FATESIM_CACHE", str(tmp_path))
    key = paper_traces.trace_key("mini-qwen-moe", 128, 2, 4)
    cached = tmp_path / "reproduce" / f"mini-qwen-moe-p128x2-d4-{key[:16]}.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"stand-in")

    def refuse(*args, **kwargs):
        raise AssertionError("recorded although cached")

    monkeypatch.setattr("traces.recorder.record_trace", refuse)
    assert paper_traces.paper_trace(Q, 128, num_prompts=2, decode_tokens=4) == cached
    with pytest.raises(UserError, match="no embedded model stands in for 'olmoe'"):
        paper_traces.paper_trace("olmoe", 128)


def _run(model: str, hw: str, budget: int, policy: str, prefill: float, decode: float, hit: float = 0.5) -> GridRun:
    return GridRun(model, hw, budget, policy, prefill, decode, hit)


@pytest.fixture()
def grid() -> Grid:
    """Two budgets per machine; prefill/decode chosen so each figure has a hand-computable answer."""
    runs = []
    for machine, (low, high) in (("rtx3090", (6, REFERENCE_GB["rtx3090"])), ("gtx1080ti", (6, REFERENCE_GB["gtx1080ti"]))):
        hw = f"{machine}-hf-eager"
        for model in (Q, D):
            for budget, scale in ((low, 1.0), (high, 2.0)):
                runs += [_run(model, hw, budget, "lod", 100.0, 2.0),
                         _run(model, hw, budget, "eap", 150.0, 4.0 * scale),
                         _run(model, hw, budget, "eap:precision=int4", 300.0, 8.0 * scale),
                         _run(model, hw, budget, "fate", 400.0 * scale, 10.0 * scale, hit=0.9 * scale / 2)]
    return Grid(runs)


def test_up_to_ratios_are_the_maximum_over_the_grid(grid: Grid) -> None:
    rows = {r["key"]: r for r in fate_rows(grid, {})}
    assert rows["fate_vs_lod_prefill"]["simulated"] == pytest.approx(8.0)  # 800 / 100 at the high budgets
    assert rows["fate_vs_lod_prefill"]["span"] == pytest.approx((4.0, 8.0))
    assert rows["fate_vs_eap_decode"]["simulated"] == pytest.approx(2.5)  # 20 / 8 at the high budgets
    # the EAP variants: fate / int4-EAP is at most 800/300 prefill, 20/16 decode
    assert rows["fate_vs_eap_prefill"]["variants"] == pytest.approx((800 / 300, 800 / 150))
    assert rows["fate_vs_eap_decode"]["variants"] == pytest.approx((20 / 16, 2.5))


def test_single_figures_are_taken_at_the_reference_budget_with_the_span(grid: Grid) -> None:
    rows = {r["key"]: r for r in fate_rows(grid, {})}
    decode = rows["rtx3090_qwen_fate_decode"]
    assert decode["simulated"] == 20.0 and decode["span"] == (10.0, 20.0)
    assert decode["error"] == pytest.approx((20.0 - 14.0) / 14.0)
    assert "24 GB" in decode["at"]
    assert rows["rtx3090_deepseek_eap_decode"]["variants"] == (8.0, 16.0)
    assert rows["gtx1080ti_deepseek_lod_prefill"]["simulated"] == 100.0
    assert rows["fate_hit_rate"]["simulated"] == pytest.approx(0.9)


def test_rows_carry_role_and_source_from_the_figure_table(grid: Grid) -> None:
    rows = fate_rows(grid, {"prefetch_accuracy_prefill": 0.97, "prefetch_accuracy_decode": 0.8})
    assert [r["key"] for r in rows] == [f.key for f in FATE_FIGURES]
    assert {r["key"] for r in rows if r["role"] == "fit-target"} == set(FIT_TARGETS)
    assert {r["source"] for r in rows} == {"P", "S"}
    text = format_fate(rows)
    assert "fit-target" in text and "prediction" in text and "+42.9%" in text  # 20 vs 14


def test_fit_targets_are_four_and_cover_both_machines() -> None:
    assert len(FIT_TARGETS) == 4
    assert {k.split("_")[0] for k in FIT_TARGETS if k[0] in "rg"} == {"rtx3090", "gtx1080ti"}


def test_log_fit_recovers_known_engine_costs() -> None:
    """Decode and prefill throughputs from the cost model with known per-layer and per-expert costs: the
    solver gets both back from the two throughputs (the same two-figure identification as the 3090 fit)."""
    spec, base = get_model_spec(D), load_profile("rtx3090-bound")
    layers, k = spec.num_moe_layers, spec.top_k

    def throughputs(p: np.ndarray) -> np.ndarray:
        hw = dataclasses.replace(base, engine=EngineOverheads(per_moe_layer_s=float(p[0]), per_expert_s=float(p[1])))
        costs = CostModel(spec, hw)
        decode_s = layers * (costs.attention_s(1, 600) + k * costs.expert_s(1, "int4") + costs.shared_s(1))
        prefill_s = layers * (costs.attention_s(512, 512) + spec.num_experts * costs.expert_s(48, "int4")
                              + costs.shared_s(512))
        return np.array([1.0 / decode_s, 512.0 / prefill_s])

    truth = np.array([1.4e-3, 2.4e-4])
    found = fit_log_parameters(throughputs, throughputs(truth), [1e-3, 1e-4])
    assert found == pytest.approx(truth, rel=1e-6)


def test_at_context_keeps_decode_tokens_at_the_long_context() -> None:
    trace = synthetic_trace(num_layers=2, num_experts=8, top_k=2, sequences=2, prompt_tokens=5, decode_tokens=3, seed=1)
    placed = at_context(trace, 1000)
    assert placed.num_prefill_tokens == 0 and placed.num_tokens == 6
    assert placed.positions.tolist() == [999, 1000, 1001, 999, 1000, 1001]
    np.testing.assert_array_equal(placed.topk_ids, trace.topk_ids[np.asarray(trace.is_prefill) == 0])


def test_every_grid_variant_is_a_valid_policy() -> None:
    """The baseline variants (serial lod, EAP precisions and prefetch counts) build: none is silently skipped."""
    from sim.policies.presets import build_policy

    for preset, overrides in reproduce.VARIANTS.values():
        build_policy(preset, overrides)
    assert reproduce.VARIANTS["lod:serial"] == ("lod", {"serial_loads": "true"})


@pytest.mark.parametrize("argv,message", [
    (["reproduce", "lrc", "--realtraces", "/nonexistent/logs"], "no routing logs at /nonexistent/logs"),
])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_table_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "moe-infinity"])
    assert exit_info.value.code == 2
