"""Capacity planning: what fast memory, and which policy, a target decode speed needs.

Two questions, both answered by replaying a trace (`sim.replay.replay`) with the model's shapes:
* **target** (`--target-decode X`): for each policy, the smallest budget whose decode throughput is >= X
  tokens/s, by bisection over the budget between "no routed expert resident" (0%) and the smaller of
  "every expert resident" (100%) and the device's memory. Throughput is assumed non-decreasing in the
  budget (more cache never hurts these policies); the search stops when the bracket is narrower than one
  bf16 expert. The answer is the policy with the smallest such budget.
* **budget** (`--budget SIZE`): every policy at that budget; the answer is the fastest decode.

The routing comes from `--trace`, or else from a trace in `traces/data/` whose routing structure (MoE
layers, experts, top-k) matches the model, replayed with the model's shapes (`--as-model`). Budgets are
those of `replay` (sim/budget.py: resident part with the KV cache of the trace's longest sequence, plus
expert slots), at most the profile's device memory; `--set` applies to every policy considered.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sim.budget import resolve_budget
from sim.layersubset import layer_coverage
from sim.units import format_bytes
from traces.errors import UserError

DEFAULT_RUNNER = "sim.replay:replay"
TRACE_DIR = Path(__file__).resolve().parents[2] / "traces" / "data"


@dataclass
class PolicyAnswer:
    """One row of the plan table."""

    policy: str
    budget_bytes: int | None
    """Smallest budget meeting the target (target mode) or the given budget; None: target not reachable."""
    decode_tokens_per_s: float | None
    """At budget_bytes (target mode: at the largest budget tried when unreachable)."""
    prefill_tokens_per_s: float | None
    replays: int
    note: str = ""


@dataclass
class PlanResult:
    """The answer line and the table behind it."""

    answer: str
    rows: list[PolicyAnswer]
    model: str
    profile: str
    trace: str
    expert_share: Callable[[int], float] = field(repr=False, default=lambda b: 0.0)
    """Budget bytes -> share (0..1) of the routed-expert bytes it holds beyond the resident part."""

    def table(self) -> str:
        """Plain-text table, one policy per line, best first."""
        lines = [f"{'policy':<20} {'budget':>12} {'experts':>8} {'decode tok/s':>13} {'prefill tok/s':>14} "
                 f"{'replays':>7}  note"]
        for r in self.rows:
            budget = "–" if r.budget_bytes is None else format_bytes(r.budget_bytes)
            share = "–" if r.budget_bytes is None else f"{100 * self.expert_share(r.budget_bytes):.1f}%"
            dec = "–" if r.decode_tokens_per_s is None else f"{r.decode_tokens_per_s:.2f}"
            pre = "–" if not r.prefill_tokens_per_s else f"{r.prefill_tokens_per_s:.1f}"  # 0: no prefill in the trace
            lines.append(f"{r.policy:<20} {budget:>12} {share:>8} {dec:>13} {pre:>14} {r.replays:>7}  {r.note}")
        return "\n".join(lines)


def default_policies() -> list[str]:
    """Every preset except `oracle` (a bound, not something one can deploy)."""
    from sim.policies.presets import PRESETS

    return [name for name in PRESETS if name != "oracle"]


def find_trace_for(spec) -> Path:
    """A trace in traces/data with the model's routing structure; UserError when there is none."""
    from sim.modelspec import check_same_structure
    from traces.format import read_trace

    candidates = sorted(TRACE_DIR.glob("*.safetensors")) if TRACE_DIR.is_dir() else []
    for path in candidates:
        try:
            check_same_structure(spec, read_trace(path))
            return path
        except UserError:
            continue
    raise UserError(f"no trace in {TRACE_DIR} has the routing structure of {spec.name}; give one with --trace")


def _resolve_runner(runner: Callable[..., dict] | str) -> Callable[..., dict]:
    from sim.analysis.sweep import _resolve_runner as resolve

    return resolve(runner)


def plan(model: str, hw: str, target_decode: float | None = None, budget: str | None = None,
         trace: str | os.PathLike[str] | None = None, policies: Sequence[str] | None = None,
         runner: Callable[..., dict] | str = DEFAULT_RUNNER, overrides: dict[str, Any] | None = None,
         layers_subset: bool = False, quiet: bool = True) -> PlanResult:
    """Answer a capacity question (module docstring); exactly one of `target_decode` and `budget`.

    `overrides` (as `--set`) apply to every policy; a budget is read as `replay` reads it
    (sim/budget.py: the KV cache of the trace's longest sequence) and must fit the profile's device."""
    from sim.hardware import load_profile
    from sim.modelspec import get_model_spec
    from sim.policies.presets import build_policy
    from sim.progress import progress_bar
    from traces.format import read_trace

    if (target_decode is None) == (budget is None):
        raise UserError("give exactly one of --target-decode TOKENS_PER_S and --budget SIZE")
    if target_decode is not None and target_decode <= 0:
        raise UserError(f"--target-decode must be more than 0 tokens/s, got {target_decode}")
    overrides = dict(overrides or {})
    spec = get_model_spec(model)
    profile = load_profile(hw)
    policies = list(policies) if policies else default_policies()
    for name in policies:
        build_policy(name, overrides)
    trace_path = Path(trace) if trace is not None else find_trace_for(spec)
    if not trace_path.is_file():
        raise UserError(f"trace file {trace_path} does not exist")
    tr = read_trace(trace_path)
    as_model = None if tr.model == spec.name else spec.name
    replay = _resolve_runner(runner)
    extra: dict[str, Any] = {}
    if runner == DEFAULT_RUNNER:
        from sim.replay import load, resolve_spec

        routing: Any = load(tr)  # steps and hash prepared once for the many replays of the bisection
        spec = resolve_spec(tr, as_model, layers_subset)  # a layer subset replays a model of those layers
        kv_tokens = routing.workload.max_context
        extra = {"layers_subset": layers_subset, "budget_option": "--budget"}
    else:
        from sim.workload import build_workload

        routing = tr
        kv_tokens = build_workload(tr).max_context
    resident = spec.resident_bytes(kv_tokens)
    routed = spec.routed_expert_bytes_total("bf16")

    def share(nbytes: int) -> float:
        return max(0.0, min(1.0, (nbytes - resident) / routed)) if routed else 0.0

    bar = progress_bar(None, "plan", "replay", quiet)

    def run(policy: str, nbytes: int) -> dict[str, Any]:
        bar.set_postfix_str(f"{policy} {format_bytes(nbytes)}")
        try:
            return replay(routing, policy=policy, hw=profile, memory_budget=str(int(nbytes)), as_model=as_model,
                          overrides=overrides, **extra)
        finally:
            bar.update(1)

    try:
        result = _answer(spec, profile, policies, target_decode, budget, trace_path, run, share, resident, routed,
                         kv_tokens)
    finally:
        bar.close()
    coverage = layer_coverage(tr)
    if coverage.partial:
        result.answer += (f" [{coverage.note()} replayed: budgets and speeds are those of a model made of "
                          f"decoder layers {list(coverage.logged)} only]")
    return result


def _answer(spec, profile, policies: list[str], target_decode: float | None, budget: str | None, trace_path: Path,
            run: Callable[[str, int], dict[str, Any]], share: Callable[[int], float], resident: int, routed: int,
            kv_tokens: int) -> PlanResult:
    """The replays behind a plan: every policy at `budget`, or a bisection per policy for `target_decode`."""
    rows: list[PolicyAnswer] = []
    if budget is not None:
        nbytes = resolve_budget(budget, spec, kv_tokens=kv_tokens, device_memory_bytes=profile.memory_bytes,
                                device=f"profile {profile.name}", option="--budget").total_bytes
        for name in policies:
            try:
                m = run(name, nbytes)
                rows.append(PolicyAnswer(name, nbytes, m["decode_tokens_per_s"], m.get("prefill_tokens_per_s"), 1))
            except UserError as error:
                rows.append(PolicyAnswer(name, None, None, None, 1, note=str(error)))
        ok = [r for r in rows if r.decode_tokens_per_s is not None]
        rows = sorted(ok, key=lambda r: -r.decode_tokens_per_s) + [r for r in rows if r.decode_tokens_per_s is None]
        if not ok:
            answer = f"no policy can run {spec.name} on {profile.name} with {format_bytes(nbytes)}"
        else:
            best = rows[0]
            answer = (f"best at {format_bytes(nbytes)}: {best.policy}, {best.decode_tokens_per_s:.2f} decode tokens/s "
                      f"({spec.name} on {profile.name})")
        return PlanResult(answer, rows, spec.name, profile.name, str(trace_path), share)

    lo_all = resident
    hi_all = min(resident + routed, profile.memory_bytes)
    step = spec.expert_bytes("bf16")
    for name in policies:
        if hi_all < lo_all:
            rows.append(PolicyAnswer(name, None, None, None, 0,
                                     note=f"the non-expert part alone ({format_bytes(lo_all)}) exceeds the device"))
            continue
        replays = 0
        try:
            top = run(name, hi_all)
            replays += 1
        except UserError as error:
            rows.append(PolicyAnswer(name, None, None, None, 1, note=str(error)))
            continue
        if top["decode_tokens_per_s"] < target_decode:
            rows.append(PolicyAnswer(name, None, top["decode_tokens_per_s"], top.get("prefill_tokens_per_s"), 1,
                                     note=f"best {top['decode_tokens_per_s']:.2f} tok/s at {format_bytes(hi_all)}"))
            continue
        lo, hi, best = lo_all, hi_all, top  # invariant: hi meets the target
        lo_refused = False  # True when lo is below what the policy can run with at all
        try:
            bottom = run(name, lo)
            replays += 1
            if bottom["decode_tokens_per_s"] >= target_decode:
                hi, best = lo, bottom
        except UserError:
            replays += 1  # too small to run at all: the bisection looks above it
            lo_refused = True
        while hi - lo > step:
            mid = (lo + hi) // 2
            replays += 1
            try:
                m = run(name, mid)
                meets = m["decode_tokens_per_s"] >= target_decode
                refused = False
            except UserError:
                meets, refused = False, True
            if meets:
                hi, best = mid, m
            else:
                lo, lo_refused = mid, refused
        note = "the smallest budget this policy runs with" if lo_refused else ""
        rows.append(PolicyAnswer(name, hi, best["decode_tokens_per_s"], best.get("prefill_tokens_per_s"), replays,
                                 note=note))
    ok = sorted((r for r in rows if r.budget_bytes is not None), key=lambda r: (r.budget_bytes, r.policy))
    rows = ok + [r for r in rows if r.budget_bytes is None]
    if not ok:
        answer = (f"no policy reaches {target_decode:g} decode tokens/s for {spec.name} on {profile.name} "
                  f"within {format_bytes(hi_all)}")
    else:
        best_row = ok[0]
        answer = (f"{format_bytes(best_row.budget_bytes)} ({100 * share(best_row.budget_bytes):.1f}% of the experts) "
                  f"with {best_row.policy} reaches {target_decode:g} decode tokens/s "
                  f"({best_row.decode_tokens_per_s:.2f}) for {spec.name} on {profile.name}")
    return PlanResult(answer, rows, spec.name, profile.name, str(trace_path), share)
