"""The offloading engine against the plain transformers model: same tokens, same logits, budget kept."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from realrun.runner import expert_budget, greedy_generate
from realrun.session import run_offloaded
from sim.metrics import METRIC_KEYS
from sim.policies.presets import build_policy
from sim.replay import replay
from sim.units import parse_budget
from tests.realrun.conftest import NEW_TOKENS, PROMPTS, fresh
from traces.errors import UserError
from traces.format import read_trace
from traces.routercapture import RouterCapture

CPU = torch.device("cpu")

# preset -> overrides that make it lossless (full-precision experts, no speculative execution), and store
LOSSLESS_FATE_AS_BEFORE = {"precision": "bf16", "miss": "wait", "shallow_layers": "-1"}
"""fate as this module's tests were written for: bf16 misses and as many shallow layers as fit (the preset
now loads misses at INT4 and caches at most 4 shallow layers, as Fate's code does)."""

LOSSLESS = {
    "lod": ({}, "disk"),
    "lru": ({}, "disk"),
    "fate": ({"precision": "bf16", "miss": "wait"}, "disk"),  # fate loads misses at INT4 (miss=lowbit)
    "speculate": ({"miss": "wait"}, "disk"),
    "cpu-exec": ({}, "ram"),
    "mixtral-offloading": ({"precision": "bf16"}, "ram"),
    "eap": ({}, "disk"),
}


def _run(references, arch, preset, overrides=None, budget="50%", store="disk", **kw):
    engines = []
    result, gen = run_offloaded(fresh(references, arch), PROMPTS, model_name=f"tiny-{arch}",
                                policy=build_policy(preset, overrides), memory_budget=budget, device=CPU,
                                store=store, max_new_tokens=NEW_TOKENS, keep_logits=True,
                                engine_hook=engines.append, profile="rtx3090-bound", **kw)
    return result, gen, engines[0]


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2"])
@pytest.mark.parametrize("preset", list(LOSSLESS))
def test_lossless_presets_reproduce_the_plain_model_exactly(references, arch: str, preset: str) -> None:
    """Lossless precision, no speculation: every generated token and every logit is bit-equal to transformers."""
    overrides, store = LOSSLESS[preset]
    result, gen, engine = _run(references, arch, preset, overrides, store=store)
    ref = references[arch][1]
    assert gen.generated == ref.generated
    for ours, theirs in zip(gen.logits, ref.logits, strict=True):
        assert torch.equal(ours, theirs)
    assert result["generated"] == ref.generated
    assert result["layer_steps"] == engine.layer_steps


def test_deepseek_v3_sigmoid_router_is_exact_too(references) -> None:
    """DeepSeek-V3 (sigmoid, group-limited routing with correction bias) under fate, lossless."""
    _, gen, _ = _run(references, "deepseek_v3", "fate", {"precision": "bf16", "miss": "wait"})
    assert gen.generated == references["deepseek_v3"][1].generated
    assert all(torch.equal(a, b) for a, b in zip(gen.logits, references["deepseek_v3"][1].logits, strict=True))


@pytest.mark.parametrize("preset", ["fate", "speculate", "hobbit"])
def test_lossy_presets_run_and_stay_close(references, preset: str) -> None:
    """INT4/INT2 transfers and speculative execution run end to end; the first logits stay near the model's."""
    result, gen, _ = _run(references, "qwen2_moe", preset)
    ref = references["qwen2_moe"][1]
    assert [len(t) for t in gen.generated] == [NEW_TOKENS] * len(PROMPTS.token_ids)
    first = torch.stack([g[0] for g in gen.logits])
    first_ref = torch.stack([g[0] for g in ref.logits])
    cosine = torch.nn.functional.cosine_similarity(first, first_ref, dim=-1)
    assert (cosine > 0.6).all()  # unrelated logits would give ~0; int2 on random weights is coarse
    if preset == "fate":
        assert result["bytes_transferred"]["total"] > 0 and result["prefetch_precision"] > 0


@pytest.mark.parametrize("preset", ["lod", "lru", "fate", "cpu-exec"])
def test_resident_expert_bytes_never_exceed_the_budget(references, preset: str) -> None:
    """Slots allocated and slots ever occupied stay within the expert budget, at a tight budget."""
    overrides, store = LOSSLESS[preset]
    budget = "30%"
    _, _, engine = _run(references, "qwen2_moe", preset, overrides, budget=budget, store=store)
    spec = engine.spec
    kv = max(len(p) for p in PROMPTS.token_ids) + NEW_TOKENS
    experts = expert_budget(parse_budget(budget, spec, kv), spec, kv)
    assert sum(engine.ctl.slots_per_layer) * engine.ctl.slot_bytes <= experts
    assert 0 < engine.max_resident_bytes <= experts
    assert engine.arena_bytes == sum(engine.ctl.slots_per_layer) * engine.slot_stride
    assert engine.arenas == [] and engine.slots == []  # closed: fast memory handed back


def test_budget_below_one_layers_top_k_is_refused(references) -> None:
    """A budget that cannot hold top-k experts per layer is a one-line UserError, before any work."""
    with pytest.raises(UserError, match="raise --memory-budget"):
        _run(references, "qwen2_moe", "lru", budget="3%")


def test_budget_below_the_dense_weights_is_refused(references) -> None:
    """A byte budget smaller than the non-expert weights says so."""
    with pytest.raises(UserError, match="non-expert weights"):
        _run(references, "qwen2_moe", "lru", budget="1000B")


def test_io_failure_stops_the_run_and_the_thread(references) -> None:
    """An injected read failure surfaces as an error of the run; the I/O thread is gone afterwards."""
    seen: list = []

    def inject(engine) -> None:
        seen.append(engine)
        calls = iter(range(1000))

        def fail(copy) -> None:
            if next(calls) == 6:
                raise OSError("injected disk failure")
        engine.loader.fail_hook = fail

    with pytest.raises(RuntimeError, match="injected disk failure"):
        run_offloaded(fresh(references, "qwen2_moe"), PROMPTS, model_name="tiny", policy=build_policy("lod"),
                      memory_budget="50%", device=CPU, store="disk", max_new_tokens=NEW_TOKENS,
                      engine_hook=inject, profile="rtx3090-bound")
    assert not seen[0].loader.alive
    assert "realrun-io" not in [t.name for t in threading.enumerate()]


def test_keyboard_interrupt_mid_run_joins_the_io_thread(references) -> None:
    """Ctrl-C during a forward propagates as KeyboardInterrupt, with the I/O thread stopped and joined."""
    seen: list = []

    def inject(engine) -> None:
        seen.append(engine)
        route = engine.ctl.on_route
        calls = iter(range(1000))

        def interrupted(*args):
            if next(calls) == 4:
                raise KeyboardInterrupt
            return route(*args)
        engine.ctl.on_route = interrupted

    with pytest.raises(KeyboardInterrupt):
        run_offloaded(fresh(references, "qwen2_moe"), PROMPTS, model_name="tiny", policy=build_policy("fate"),
                      memory_budget="50%", device=CPU, store="disk", max_new_tokens=NEW_TOKENS,
                      engine_hook=inject, profile="rtx3090-bound")
    assert not seen[0].loader.alive


def test_metrics_keys_timeline_and_trace_of_the_run(references, tmp_path: Path) -> None:
    """Same metric keys as replay (+ generated); the timeline is Chrome JSON; the trace is the run's routing."""
    timeline, trace_path = tmp_path / "t.json", tmp_path / "run.safetensors"
    result, gen, engine = _run(references, "qwen2_moe", "fate", LOSSLESS_FATE_AS_BEFORE, timeline=timeline,
                               trace_out=trace_path)
    assert set(METRIC_KEYS) <= set(result)
    assert {"policy", "policy_components", "memory_budget_bytes", "expert_budget_bytes", "slots_per_layer",
            "peak_expert_bytes", "profile", "model", "trace_hash", "generated", "io", "peak_device_bytes",
            "peak_host_rss_bytes"} <= set(result)
    assert engine.max_resident_bytes <= result["peak_expert_bytes"] <= result["expert_budget_bytes"]
    events = json.loads(timeline.read_text())["traceEvents"]
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"GPU stream", "CPU predictor", "copy engine 0"} <= names
    assert any(e["ph"] == "X" and e["tid"] == 10 for e in events)
    trace = read_trace(trace_path)
    assert result["trace_hash"] == trace.content_hash()
    simulated = replay(trace, policy=build_policy("fate", LOSSLESS_FATE_AS_BEFORE), hw="rtx3090-bound",
                       memory_budget="50%")
    realrun_only = {"generated", "io", "peak_device_bytes", "peak_host_rss_bytes"}
    assert set(simulated) == set(result) - realrun_only  # realrun and replay emit the same keys
    io = result["io"]
    assert io["copies"] > 0 and io["busy_s"] > 0
    assert 0 < io["bytes"] <= result["bytes_transferred"]["total"]  # copies cancelled before they ran are not in
    lens = [len(p) + NEW_TOKENS - 1 for p in PROMPTS.token_ids]
    assert trace.num_tokens == sum(lens) and trace.num_prefill_tokens == sum(len(p) for p in PROMPTS.token_ids)
    assert trace.lookahead_depth == 1
    # the routing in the trace is what the plain model routes on the same tokens
    model = references["qwen2_moe"][0]
    start = 0
    with torch.inference_mode(), RouterCapture(model) as capture:
        for n in lens:
            ids = torch.tensor([trace.token_ids[start:start + n].tolist()])
            model(input_ids=ids)
            for layer, call in enumerate(capture.take_last()):
                ours = np.sort(trace.topk_ids[start:start + n, layer].astype(np.int64), axis=1)
                assert np.array_equal(ours, np.sort(call.ids.numpy(), axis=1))
            start += n


def test_engine_memory_is_freed_without_waiting_for_the_garbage_collector(references) -> None:
    """After a run the engine (and with it the slot arenas) is freed by reference counting alone."""
    import gc
    import weakref

    refs: list = []
    gc.disable()
    try:
        run_offloaded(fresh(references, "qwen2_moe"), PROMPTS, model_name="tiny", policy=build_policy("lru"),
                      memory_budget="50%", device=CPU, store="ram", max_new_tokens=2,
                      engine_hook=lambda engine: refs.append(weakref.ref(engine)), profile="rtx3090-bound")
        assert refs[0]() is None
    finally:
        gc.enable()


def test_speculative_substitution_is_transformers_on_the_rewritten_routing() -> None:
    """Under `speculate` (bf16, substitutes on misses) every logit is bit-equal to the plain model whose
    experts modules see the routing rewritten as realrun served it: each substituted routed expert's id
    replaced by its substitute's, the weights unchanged (the substitute's weights serve those tokens).
    Top-3 routing, so the order in which the three outputs are summed shows in the bits."""
    import copy as copying

    from realrun.engine import moe_blocks
    from tests.realrun.conftest import tiny_qwen

    plain = tiny_qwen(top_k=3)
    served: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def spy(engine) -> None:
        route = engine.ctl.on_route

        def on_route(layer, ids, counts):
            plan = route(layer, ids, counts)
            if plan.substitutions:
                served[(engine.step, layer)] = list(plan.substitutions)
            return plan
        engine.ctl.on_route = on_route

    _, gen = run_offloaded(copying.deepcopy(plain), PROMPTS, model_name="tiny", policy=build_policy("speculate"),
                           memory_budget="40%", device=CPU, store="ram", max_new_tokens=NEW_TOKENS, keep_logits=True,
                           engine_hook=spy, profile="rtx3090-bound")
    assert len(served) >= 3  # the case under test happens, in several layer steps
    model = copying.deepcopy(plain)
    step = [-1]
    for layer, (_, block) in enumerate(moe_blocks(model)):
        def rewritten(hidden, top_k_index, top_k_weights, layer=layer, forward=block.experts.forward):
            index = top_k_index.clone()
            for routed, substitute in served.get((step[0], layer), []):
                index[top_k_index == routed] = substitute
            return forward(hidden, index, top_k_weights)
        block.experts.forward = rewritten

    def on_forward(n: int, phase: str, tokens: int) -> None:
        step[0] = n

    ref = greedy_generate(model, PROMPTS.token_ids, NEW_TOKENS, CPU, on_forward=on_forward, keep_logits=True)
    assert gen.generated == ref.generated
    assert all(torch.equal(a, b) for a, b in zip(gen.logits, ref.logits, strict=True))
    unchanged = greedy_generate(plain, PROMPTS.token_ids, NEW_TOKENS, CPU, keep_logits=True)
    assert not all(torch.equal(a, b) for a, b in zip(gen.logits, unchanged.logits, strict=True))  # it is lossy
