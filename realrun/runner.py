"""The pieces of one realrun: the greedy loop, the slow tier's construction, the budget arithmetic.

`greedy_generate` is the one decode loop, used for the offloaded model and (in tests and the benchmark)
for the plain transformers model, so both are timed and compared the same way. Each prompt runs as its
own sequence: one prefill forward of all its tokens, then one forward per generated token (greedy, KV
cache), as the simulator replays it. `realrun.session.run_offloaded` puts the pieces together.

Clocks: `time.perf_counter` around each forward, after `torch.cuda.synchronize()` on CUDA (gpt-fast's
`device_sync` before every clock read). `run_offloaded` precedes the timed run with one untimed warm-up
forward (the first 8 tokens of the first prompt, on the model before offloading: allocator, kernels,
thread pools), as gpt-fast does.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from realrun.quant import ExpertLayout, expert_layout, pack_expert, split_fused
from realrun.store import RamStore, SlowStore, reusable_disk_store
from sim.modelspec import ModelSpec
from sim.policies.presets import PolicyConfig
from sim.policies.requirements import storage_precisions as policy_storage_precisions
from traces.errors import UserError


@dataclass
class Generation:
    """Tokens and clocks of one greedy run over several prompts (times: perf_counter seconds)."""

    generated: list[list[int]] = field(default_factory=list)
    """Token ids generated for each prompt."""
    logits: list[torch.Tensor] = field(default_factory=list)
    """Per prompt [new tokens, V] float32 logits of each step's last position (keep_logits only)."""
    phases: list[str] = field(default_factory=list)
    """Per forward step: "prefill" or "decode"."""
    num_tokens: list[int] = field(default_factory=list)
    """Per forward step: tokens processed."""
    step_start_at: list[float] = field(default_factory=list)
    step_end_at: list[float] = field(default_factory=list)

    def seconds(self, phase: str) -> list[float]:
        """Durations of the steps of `phase`."""
        return [e - s for p, s, e in zip(self.phases, self.step_start_at, self.step_end_at, strict=True)
                if p == phase]

    def tokens(self, phase: str) -> int:
        return sum(n for p, n in zip(self.phases, self.num_tokens, strict=True) if p == phase)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def greedy_generate(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, device: torch.device, *,
                    on_forward: Callable[[int, str, int], None] | None = None, keep_logits: bool = False,
                    progress: Callable[[int], None] | None = None) -> Generation:
    """Greedy decoding of each prompt separately; `on_forward(step, phase, tokens)` runs before each forward.

    Every prompt yields `max_new_tokens` tokens (>= 1): the prefill forward gives the first.
    """
    from transformers import DynamicCache

    out = Generation()
    for prompt in prompts:
        cache = DynamicCache(config=model.config)
        new: list[int] = []
        step_logits = []
        ids = torch.tensor([prompt], dtype=torch.long, device=device)
        for i in range(max(1, max_new_tokens)):
            phase = "prefill" if i == 0 else "decode"
            if on_forward is not None:
                on_forward(len(out.phases), phase, ids.shape[1])
            _sync(device)
            start = time.perf_counter()
            # logits of the last position only, as serving engines do (a prefill of n tokens would
            # otherwise multiply all n hidden states by the vocabulary head)
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            token = int(logits.argmax(-1))  # greedy; the host needs the token to feed the next step anyway
            _sync(device)
            out.step_start_at.append(start)
            out.step_end_at.append(time.perf_counter())
            out.phases.append(phase)
            out.num_tokens.append(ids.shape[1])
            new.append(token)
            if keep_logits:
                step_logits.append(logits[0].float().cpu())
            if progress is not None:
                progress(1)
            ids = torch.tensor([[token]], dtype=torch.long, device=device)
        out.generated.append(new)
        if keep_logits:
            out.logits.append(torch.stack(step_logits))
    return out


# --- slow tier ---------------------------------------------------------------------------------------
def storage_precisions(policy: PolicyConfig) -> list[str]:
    """Every precision the policy may load (and CPU execution reads), i.e. what the slow tier must hold."""
    return list(policy_storage_precisions(policy))


def packing_for(spec: ModelSpec, precision: str, device: torch.device) -> str:
    """int4 on a CPU device is stored in the CPU int4 kernel's layout (when both matrix widths are whole
    groups, as the kernel needs); everything else in HQQ's."""
    whole = spec.hidden_size % 64 == 0 and spec.expert_intermediate_size % 64 == 0
    return "tinygemm" if precision == "int4" and device.type == "cpu" and whole else "hqq"


def expert_source(blocks: list[tuple[int, nn.Module]], layouts: dict[str, ExpertLayout], *,
                  optimize: bool) -> Callable[[int, int, str], torch.Tensor]:
    """(layer, expert, precision) -> packed record, from the model's fused expert weights."""
    def source(layer: int, expert: int, precision: str) -> torch.Tensor:
        experts = blocks[layer][1].experts
        weights = split_fused(experts.gate_up_proj[expert], experts.down_proj[expert])
        return pack_expert(weights, layouts[precision], optimize=optimize)
    return source


def weights_fingerprint(spec: ModelSpec, blocks: list[tuple[int, nn.Module]], precisions: list[str],
                        optimize: bool) -> str:
    """Identifies the experts' weights (first and last expert of each layer, exactly) and the store options."""
    h = hashlib.sha256(json.dumps([torch.__version__, spec.name, spec.num_moe_layers, spec.num_experts, spec.hidden_size,
                                   spec.expert_intermediate_size, spec.dtype, precisions, optimize]).encode())
    for _, block in blocks:
        for e in (0, spec.num_experts - 1):
            for w in (block.experts.gate_up_proj[e], block.experts.down_proj[e]):
                h.update(w.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def build_store(spec: ModelSpec, blocks: list[tuple[int, nn.Module]], precisions: list[str], kind: str,
                device: torch.device, *, store_path: Path | None = None, store_dir: Path | None = None,
                optimize: bool = True,
                progress: Callable[[int], None] | None = None) -> tuple[SlowStore, dict[str, ExpertLayout]]:
    """The slow tier holding every expert in `precisions`: "ram" (pinned for CUDA) or "disk" at `store_path`
    (or, without one, `store_dir`/<fingerprint>.bin).

    A disk store whose header fingerprint matches the weights and options is reused, not rewritten: HQQ's
    optimiser takes seconds per matrix on a CPU, so a model's quantised copies are made once.
    """
    layouts = {p: expert_layout(spec, p, packing_for(spec, p, device)) for p in precisions}
    source = expert_source(blocks, layouts, optimize=optimize)
    if kind == "ram":
        def drop_weights(layer: int) -> None:  # the model's copy is not needed once the store holds it
            experts = blocks[layer][1].experts
            experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.new_empty(0), requires_grad=False)
            experts.down_proj = nn.Parameter(experts.down_proj.new_empty(0), requires_grad=False)

        return RamStore(layouts, spec.num_moe_layers, spec.num_experts, source, pin_memory=device.type == "cuda",
                        layer_done=drop_weights), layouts
    if kind != "disk":
        raise UserError(f"unknown store {kind!r}; choose disk or ram")
    fingerprint = weights_fingerprint(spec, blocks, [f"{p}:{lay.packing}" for p, lay in layouts.items()], optimize)
    store = reusable_disk_store(layouts, spec.num_moe_layers, spec.num_experts, source, fingerprint,
                                store_path=store_path, store_dir=store_dir, progress=progress)
    return store, layouts


def expert_budget(total_bytes: int, spec: ModelSpec, kv_tokens: int) -> int:
    """Bytes left for routed-expert slots: the budget minus non-expert weights, shared experts and KV cache."""
    resident = spec.resident_bytes(kv_tokens)
    if total_bytes <= resident:
        raise UserError(f"memory budget {total_bytes} B does not even hold the non-expert weights, shared experts "
                        f"and KV cache ({resident} B); raise --memory-budget")
    return total_bytes - resident


def popularity_counts(model: nn.Module, prompts: list[list[int]], device: torch.device,
                      num_layers: int, num_experts: int) -> np.ndarray:
    """[L, E] routed-token counts from one untimed prefill of every prompt on the plain model (for the
    `popularity` allocation, as Fiddler profiles before serving)."""
    from traces.routercapture import RouterCapture

    counts = np.zeros((num_layers, num_experts), dtype=np.int64)
    with torch.inference_mode(), RouterCapture(model) as capture:
        for prompt in prompts:
            model(input_ids=torch.tensor([prompt], device=device))
            for layer, calls in enumerate(capture.calls):
                for call in calls:
                    counts[layer] += np.bincount(call.ids.cpu().numpy().ravel(), minlength=num_experts)
            capture.clear()
    return counts
