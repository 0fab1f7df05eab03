"""The real offloading engine: a transformers MoE model whose routed experts live in a slow tier.

`OffloadEngine` takes a loaded transformers 5.x MoE model (Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3, Mixtral,
OLMoE), a slow-tier store holding every expert in every precision the policy may load, and an
`sim.policies.controller.OffloadController`; it then

1. swaps each MoE block's fused `experts` module for `realrun.experts.OffloadedExperts` (same call
   signature, no weights) and frees the original expert weights;
2. allocates fast memory once: `slots_per_layer[l]` slots per MoE layer of `slot_bytes` each (page-aligned
   host memory on CPU, device memory on CUDA), plus one dequantisation buffer per precision;
3. hooks each router with a forward pre-hook: when layer l's gate input exists, the next layers' routers
   are applied to it (the live cross-layer gate, Fate's predictor input) and the controller's prefetches
   go to the I/O thread;
4. serves each layer's experts in the controller's plan order: resident experts first, then each in-flight
   or on-demand expert as soon as its bytes land (the only wait), substituted experts as the plan says;
   CPU-executed misses run on a worker thread alongside (`realrun.cpu_experts`, devices with their own
   memory) or inline (the host device); the outputs are summed in ascending expert order exactly as
   transformers does, so a lossless run gives the plain model's logits bit for bit.

The engine never decides anything: allocation, eviction, prediction, prefetch, precision, miss handling
and cancellation are the controller's (the same object the simulator drives). It owns bytes and clocks.
Per-step order of calls: `start_forward`, then per MoE layer `on_gate_input` (pre-hook) and `on_route`
(experts module); `on_transfer_started` / `on_transfer_done` are reported before every `on_route`.

Streams and slots (`realrun.device`; the rules are checked on a fake device in CI): the compute stream
waits on a copy's end event before it reads the slot (`_await`); a copy into a slot waits on the event
recorded on the compute stream after the slot's last read (`slot_free`) and on the slot's previous copy
if that has not landed (`_submit`), so a copy the controller cancelled too late (the I/O thread had
started it) still lands before its slot is refilled. Every stall, copy and layer's expert work is timed
by a pair of events (CUDA events on a GPU, perf_counter on the host), read after each step's sync.

Shape letters: N tokens in the forward, H hidden size, E experts, k experts per token, D look-ahead depth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from realrun.cpu_experts import CpuExperts
from realrun.device import Device, Event, PendingTimes, device_for
from realrun.experts import OffloadedExperts, expert_forward
from realrun.loader import Copy, Loader
from realrun.quant import Dequantizer, ExpertLayout, Int4Matmuls, raw_views
from realrun.store import SlowStore, aligned_buffer, round_up
from sim.modelspec import ModelSpec
from sim.policies.controller import LayerPlan, OffloadController, Transfer
from sim.policies.prediction import Signals
from sim.policies.requirements import lookahead_probabilities, needs_lookahead
from traces.errors import UserError
from traces.routercapture import find_routers


@dataclass
class Span:
    """One interval on a timeline track (perf_counter seconds)."""

    track: str
    """"compute", "io" or "predictor"."""
    name: str
    start_at: float
    end_at: float
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class RouteRecord:
    """What one MoE layer routed in one forward (kept for --trace-out)."""

    topk_ids: np.ndarray
    """[N, k] int64."""
    topk_weights: np.ndarray
    """[N, k] float32."""
    router_logits: np.ndarray
    """[N, E] float32."""
    lookahead_logits: np.ndarray | None
    """[D, N, E] float32: gates of layers l+1..l+D on layer l's gate input (0 past the last layer)."""


def moe_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(decoder index, MoE block) of every MoE layer; the block has `gate` (router) and `experts`."""
    blocks = []
    base = model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model
    for index, router in find_routers(model):
        block = base.layers[index].mlp
        experts = getattr(block, "experts", None)
        fused = hasattr(experts, "gate_up_proj") or isinstance(experts, OffloadedExperts)  # meta tensors do too
        if experts is None or not fused or block.gate is not router:
            raise UserError(f"decoder layer {index}: MoE block without fused experts (gate_up_proj); "
                            "transformers 5.x is required")
        blocks.append((index, block))
    return blocks


def spec_of(model: nn.Module, name: str) -> ModelSpec:
    """The `ModelSpec` of a loaded model, with the dtype its weights really have."""
    cfg = model.config.to_dict()
    cfg["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    cfg["torch_dtype"] = cfg["dtype"]
    return ModelSpec.from_hf_config(cfg, name=name)


class OffloadEngine:
    """Runs `model` with its routed experts offloaded to `store`, under `controller` (see module doc)."""

    def __init__(self, model: nn.Module, spec: ModelSpec, controller: OffloadController, store: SlowStore,
                 layouts: dict[str, ExpertLayout], device: torch.device, *, record_routes: bool = False,
                 lookahead: int = 1, dev: Device | None = None) -> None:
        """`dev`: the device interface to run on (default: `realrun.device.device_for(device)`; tests pass
        `realrun.fake_device.FakeDevice`)."""
        self.model = model
        self.spec = spec
        self.ctl = controller
        self.store = store
        self.layouts = layouts
        self.device = device
        self.dev = dev if dev is not None else device_for(device)
        """Streams, events, waits and copies (realrun.device)."""
        self.record_routes = record_routes
        """Keep every layer's routing of every forward in `routes` (for --trace-out)."""
        self.lookahead = max(1, lookahead)
        """D: how many layers ahead the live cross-layer gate is computed for."""
        self.blocks = moe_blocks(model)
        if len(self.blocks) != spec.num_moe_layers:
            raise UserError(f"model has {len(self.blocks)} MoE layers, its config says {spec.num_moe_layers}")
        # The routers' weights in float32, [E, H] each: the live cross-layer gate multiplies by them.
        self.router_weights = [b.gate.weight.detach().float() for _, b in self.blocks]
        # 512-byte multiples keep every slot aligned for dtype views and DMA (4 KiB on a disk store)
        self.slot_stride = round_up(max(store.padded_bytes(p) for p in layouts), 512)
        """Bytes between slots: the largest record, rounded up (O_DIRECT needs 4 KiB on a disk store)."""
        if controller.slot_bytes < max(lay.nbytes for lay in layouts.values()):
            raise ValueError("controller slots are smaller than the records the store holds")
        self.arenas: list[torch.Tensor] = []
        """One buffer per MoE layer holding its slots back to back (allocated once)."""
        self.slots: list[list[torch.Tensor]] = []
        for n in controller.slots_per_layer:
            arena = self.dev.fast_buffer(n * self.slot_stride)
            self.arenas.append(arena)
            self.slots.append([arena[i * self.slot_stride : (i + 1) * self.slot_stride] for i in range(n)])
        self.arena_bytes = sum(a.numel() for a in self.arenas)
        """Fast memory allocated for slots (slot stride x slots; the stride pads records for alignment)."""
        self.dequant = {p: Dequantizer(lay, device) for p, lay in layouts.items()
                        if lay.group_size and lay.packing == "hqq"}
        self.int4_mm = {p: Int4Matmuls(lay) for p, lay in layouts.items() if lay.packing == "tinygemm"}
        self.slot_free: list[list[Event | None]] = [[None] * n for n in controller.slots_per_layer]
        """Per slot: recorded on the compute stream after its contents were last read (copies wait on it)."""
        self._slot_copy: list[list[Copy | None]] = [[None] * n for n in controller.slots_per_layer]
        """Per slot: the last copy submitted into it (the next one is ordered after it)."""
        self._copies: dict[Transfer, Copy] = {}
        """Copies the controller still expects news of, by its Transfer."""
        self._in_flight: list[Copy] = []
        self._hooks: list[Any] = []
        self.step = -1
        self.phase = "prefill"
        self._timing = PendingTimes(self.dev)
        """Stalls and compute spans whose events have not been read yet (settled after each step's sync)."""
        self.stall_s = 0.0
        """Seconds the compute stream waited for expert bytes or CPU-computed experts (settled so far)."""
        self.stall_s_by_phase = {"prefill": 0.0, "decode": 0.0}
        self.predictor_s = 0.0
        """Seconds spent computing the live cross-layer gate and the controller's prefetch decisions."""
        self.cancel_races = 0
        """Copies the controller cancelled that the I/O thread had started already (their bytes landed)."""
        self.spans: list[Span] = []
        self.routes: list[list[RouteRecord]] = []
        """routes[step][layer] when `record_routes`."""
        self.layer_steps = 0
        self.max_resident_bytes = 0
        """Largest slot bytes the controller held at once (sum over layers of occupied slots x slot_bytes)."""
        self._pending_lookahead: list[np.ndarray | None] = [None] * spec.num_moe_layers
        self.cpu = CpuExperts(self.dev, self._host_weights) if self.dev.separate_memory else None
        """The CPU worker for missed experts (devices with their own memory; the host computes them inline)."""
        self._install()
        self._preload()
        # last: nothing after this may fail and leave the I/O thread running without an owner
        staging = self.slot_stride if self.dev.separate_memory and store.host_staging else 0
        self.loader = Loader(store, self.dev, staging_bytes=staging)

    # --- setup -----------------------------------------------------------------------------------
    def _install(self) -> None:
        for layer, (_, block) in enumerate(self.blocks):
            old = block.experts
            block.experts = OffloadedExperts(layer, self.spec.num_experts, old.act_fn, self)
            del old  # the original weights are freed once the caller drops its references
            self._hooks.append(block.gate.register_forward_pre_hook(self._gate_hook(layer)))

    def _preload(self) -> None:
        """Experts the allocation pins (e.g. cpu-exec's most popular) are loaded before serving, untimed."""
        for cache in self.ctl.caches:
            for t in cache.resident.values():
                if t.kind == "preload":
                    self._read_now(t)
        self.dev.synchronize()

    def _read_now(self, t: Transfer) -> None:
        dst = self.slots[t.layer][t.slot]
        if not self.dev.separate_memory:
            self.store.read_into(t.layer, t.expert, t.precision, dst)
            return
        host = self.store.host_record(t.layer, t.expert, t.precision)
        if host is None:
            host = aligned_buffer(self.store.padded_bytes(t.precision))
            self.store.read_into(t.layer, t.expert, t.precision, host)
        self.dev.issue(self.dev.copy, lambda: dst[: host.numel()].copy_(host), writes={slot_key(t.layer, t.slot): dst})

    def close(self) -> None:
        """Stop the I/O thread and the CPU worker, remove hooks, settle the timings, free fast memory;
        re-raises a pending I/O error.

        Also cuts the model -> experts module -> engine reference cycle, so the slot arenas go back to the
        system now rather than at some later garbage collection (a caller running many models in one
        process would otherwise pile them up).
        """
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for _, block in self.blocks:
            if isinstance(block.experts, OffloadedExperts):
                block.experts._runner = None
        try:
            if self.cpu is not None:
                self.cpu.close()
            self.loader.close()
            self.dev.synchronize()
            self._timing.settle(block=True)
        finally:
            self.slots, self.arenas, self.dequant, self.int4_mm = [], [], {}, {}

    def __enter__(self) -> OffloadEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
            return
        try:  # unwinding already (error or Ctrl-C): stop the thread, keep the original exception
            self.close()
        except Exception:
            pass

    # --- one forward -----------------------------------------------------------------------------
    def start_forward(self, step: int, phase: str, num_tokens: int) -> None:
        """Call before each model forward: one prefill of a prompt, or one decode token. The previous step
        ended with a sync (the host read its token), so its events are read now."""
        self.settle()
        self.step = step
        self.phase = phase
        self.ctl.start_forward(step, phase, num_tokens)
        if self.record_routes:
            self.routes.append([])

    def settle(self) -> None:
        """Read the times of every stall, compute span and copy whose events have completed."""
        self._timing.settle()
        self.loader.settle()

    def _gate_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self._on_gate_input(layer, args[0])
        return hook

    def _on_gate_input(self, layer: int, x: torch.Tensor) -> None:
        """Layer `layer`'s gate input x [.., H] exists: live cross-layer gate -> controller -> prefetches."""
        start = time.perf_counter()
        x = x.reshape(-1, x.shape[-1]).float()  # [N, H]
        num_layers, num_experts = self.spec.num_moe_layers, self.spec.num_experts
        need = needs_lookahead(self.ctl.policy) or self.record_routes
        lookahead = None
        if need:
            # gates of layers l+1..l+D on this gate input: what Fate's predictor sees [D, N, E]
            lookahead = np.zeros((self.lookahead, x.shape[0], num_experts), dtype=np.float32)
            for d in range(1, self.lookahead + 1):
                if layer + d < num_layers:
                    lookahead[d - 1] = F.linear(x, self.router_weights[layer + d]).cpu().numpy()
        self._pending_lookahead[layer] = lookahead
        probs = None if lookahead is None else lookahead_probabilities(lookahead)
        signals = Signals(step=self.step, phase=self.phase, num_tokens=x.shape[0], lookahead_probs=probs)
        self._report_transfers()
        for t in self.ctl.on_gate_input(layer, signals):
            self._submit(t)
        self.max_resident_bytes = max(self.max_resident_bytes, self.ctl.resident_bytes())
        end = time.perf_counter()
        self.predictor_s += end - start
        self.spans.append(Span("predictor", f"predict L{layer}", start, end))

    # --- copies ----------------------------------------------------------------------------------
    def _submit(self, t: Transfer) -> Copy:
        """Hand the controller's transfer to the I/O thread, ordered after the slot's last reader and after
        the slot's previous copy if that has not landed (it may have started before a cancel arrived)."""
        layer, slot = t.layer, t.slot
        previous = self._slot_copy[layer][slot]
        after = previous if previous is not None and not previous.cancelled and not previous.landed() else None
        copy = Copy(layer, t.expert, t.precision, self.slots[layer][slot], "demand" if t.kind == "demand" else "prefetch",
                    key=slot_key(layer, slot), tag=t, slot_free=self.slot_free[layer][slot], after=after)
        self._slot_copy[layer][slot] = copy
        self._copies[t] = copy
        self._in_flight.append(copy)
        return self.loader.submit(copy)

    def _cancel(self, t: Transfer) -> None:
        """The controller dropped `t` (a stale prefetch, or an evicted queued occupant): never report it
        again; drop its copy unless the I/O thread started it already (then its bytes land, and the next
        copy into its slot is ordered after it: `_submit`)."""
        copy = self._copies.pop(t, None)
        if copy is None:
            return
        self._in_flight.remove(copy)
        if not self.loader.cancel(copy):
            self.cancel_races += 1

    def _report_transfers(self) -> None:
        """Tell the controller which copies started and which landed since the last report."""
        still = []
        for copy in self._in_flight:
            t = copy.tag
            if copy.cancelled:
                self._copies.pop(t, None)
                continue
            if copy.started_at is not None:
                self.ctl.on_transfer_started(t)
            if copy.landed():
                self.ctl.on_transfer_done(t)
                self._copies.pop(t, None)
                continue
            still.append(copy)
        self._in_flight = still

    def _await(self, t: Transfer) -> None:
        """Order the compute stream after `t`'s bytes have landed; the wait, if any, is a timed stall."""
        copy = self._copies.get(t)
        if copy is None or copy.landed():
            return  # landed, and the host saw it (the compute stream's next work is ordered after it)
        dev = self.dev
        begin = dev.record(dev.compute)
        self.loader.wait(copy)  # host: until the I/O thread has issued it
        dev.wait(dev.compute, copy.end)
        end = dev.record(dev.compute)
        self._timing.add(begin, end, lambda s, e, phase=self.phase: self._stalled(phase, e - s))

    def _stalled(self, phase: str, seconds: float) -> None:
        self.stall_s += seconds
        self.stall_s_by_phase[phase] += seconds

    # --- one layer's experts ---------------------------------------------------------------------
    def run_experts(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, act_fn) -> torch.Tensor:
        """The routed experts of `layer` on hidden [N, H] -> [N, H] (see the module docstring)."""
        dev = self.dev
        started = dev.record(dev.compute)
        num_experts = self.spec.num_experts
        with torch.no_grad():  # the same mask as transformers' eager loop: [E + 1, k, N]
            expert_mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        index_host = top_k_index.cpu()  # the controller needs the routing on the host: one sync
        ids_np, counts_np = np.unique(index_host.numpy(), return_counts=True)
        self._report_transfers()
        plan = self.ctl.on_route(layer, ids_np.astype(np.int64), counts_np.astype(np.int64))
        self.layer_steps += 1
        self.max_resident_bytes = max(self.max_resident_bytes, self.ctl.resident_bytes())
        if self.record_routes:
            self._record(layer, hidden, top_k_index, top_k_weights)
        outputs = self._execute(plan, hidden, expert_mask, index_host, top_k_weights, act_fn)
        final = torch.zeros_like(hidden)
        for expert in sorted(outputs):  # transformers adds expert outputs in ascending id order
            token_idx, y = outputs[expert]
            final.index_add_(0, token_idx, y.to(final.dtype))
        args = {"step": self.step, "hits": len(plan.hits), "loads": len(plan.loads), "cpu": len(plan.cpu_work)}
        self._timing.add(started, dev.record(dev.compute), lambda s, e, name=f"experts L{layer}", args=args:
                         self.spans.append(Span("compute", name, s, e, args)))
        return final

    def _execute(self, plan: LayerPlan, hidden: torch.Tensor, expert_mask: torch.Tensor, index_host: torch.Tensor,
                 top_k_weights: torch.Tensor, act_fn) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        dev, layer = self.dev, plan.layer
        for t in plan.cancelled:
            self._cancel(t)
        for t in plan.promoted:
            copy = self._copies.get(t)
            if copy is not None:
                self.loader.promote(copy)
        deferred: dict[int, list[Transfer]] = {}
        # an expert of this step whose slot a later load reuses is no longer in the controller's cache
        slot_of = {t.reuses_slot_of: t.slot for t in plan.loads if t.reuses_slot_of is not None}
        for t in plan.loads:  # demand loads go out at once, unless their slot's occupant computes first
            if t.after_compute is not None:
                deferred.setdefault(t.after_compute, []).append(t)
            else:
                self._submit(t)
        cpu_job = None
        if plan.cpu_work and self.cpu is not None:  # before the GPU experts: the CPU works alongside
            cpu_job = self.cpu.start(layer, [e for e, _ in plan.cpu_work], hidden, index_host, top_k_weights, act_fn)
        # speculative execution: a substitute's weights serve the tokens of the routed expert it replaces
        served_by = {sub: routed for routed, sub in plan.substitutions}
        outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        used: list[int] = []
        for expert, _tokens, precision, transfer in plan.gpu_work:
            if transfer is not None:
                self._await(transfer)
            slot = transfer.slot if transfer is not None else slot_of.get(expert)
            if slot is None:
                slot = self._slot_of(layer, expert)
            routed = served_by.get(expert, expert)
            dev.access(dev.compute, slot_key(layer, slot))
            record, layout = self._slot_record(layer, slot, expert, precision)
            # keyed by the expert computed: the sum's order is transformers' on the routing as served
            outputs[expert] = self._compute(record, layout, precision, hidden, expert_mask[routed], top_k_weights,
                                            act_fn)
            waiting = deferred.pop(expert, None)
            if waiting:  # a load reuses this slot now: it may land once this compute is done
                self.slot_free[layer][slot] = dev.record(dev.compute, timed=False)
                for t in waiting:
                    self._submit(t)
            else:
                used.append(slot)
        if used:  # one event after the layer's experts marks the end of every other slot's use
            free = dev.record(dev.compute, timed=False)
            for slot in used:
                self.slot_free[layer][slot] = free
        if cpu_job is not None:
            outputs.update(self.cpu.finish(cpu_job, self.device, self._timing,
                                           lambda s, phase=self.phase: self._stalled(phase, s)))
        else:
            for expert, _tokens in plan.cpu_work:
                outputs[expert] = self._cpu_expert_inline(layer, expert, hidden, expert_mask[expert], top_k_weights,
                                                          act_fn)
        for ts in deferred.values():  # occupants that were not computed after all: release their slots now
            for t in ts:
                self._submit(t)
        return outputs

    def _slot_of(self, layer: int, expert: int) -> int:
        t = self.ctl.caches[layer].resident.get(expert)
        if t is None:
            raise RuntimeError(f"controller planned expert {expert} of layer {layer} but it is not resident")
        return t.slot

    def _slot_record(self, layer: int, slot: int, expert: int, precision: str) -> tuple[torch.Tensor, ExpertLayout]:
        """The record in a slot and its layout: the one place a slot's bytes are interpreted."""
        return self.slots[layer][slot], self.layouts[precision]

    def _compute(self, record: torch.Tensor, layout: ExpertLayout, precision: str, hidden: torch.Tensor,
                 mask: torch.Tensor, top_k_weights: torch.Tensor, act_fn) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert from its record on the tokens `mask` [k, N] routes to it -> (token_idx, [n, H])."""
        if layout.packing == "tinygemm":  # CPU int4: multiply straight from the packed slot
            top_k_pos, token_idx = torch.where(mask)
            y = self.int4_mm[precision].forward(record, hidden[token_idx], act_fn)
            return token_idx, y * top_k_weights[token_idx, top_k_pos, None]
        if layout.group_size == 0:
            gate_up, down = raw_views(record, layout)  # lossless: compute straight from the slot, no copy
        else:
            gate_up, down = self.dequant[precision].unpack_into(record)
        if gate_up.dtype != hidden.dtype:  # records keep the checkpoint's dtype; compute runs in --dtype
            gate_up, down = gate_up.to(hidden.dtype), down.to(hidden.dtype)
        return self._one(hidden, mask, top_k_weights, gate_up, down, act_fn)

    @staticmethod
    def _one(hidden: torch.Tensor, mask: torch.Tensor, top_k_weights: torch.Tensor, gate_up: torch.Tensor,
             down: torch.Tensor, act_fn) -> tuple[torch.Tensor, torch.Tensor]:
        top_k_pos, token_idx = torch.where(mask)  # mask [k, N]: the same token order as transformers
        y = expert_forward(hidden[token_idx], gate_up, down, act_fn, top_k_weights[token_idx, top_k_pos, None])
        return token_idx, y

    def _host_precision(self) -> str:
        return "bf16" if "bf16" in self.layouts else next(iter(self.layouts))

    def _host_weights(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A missed expert's weights in host RAM, without a copy (CPU execution reads them there)."""
        precision = self._host_precision()
        record = self.store.host_record(layer, expert, precision)
        if record is None:
            raise UserError("CPU execution of missed experts reads them from host RAM; use --store ram")
        if self.layouts[precision].group_size:
            raise UserError("CPU execution on an accelerator needs the experts' bf16 copies in host RAM")
        return raw_views(record, self.layouts[precision])

    def _cpu_expert_inline(self, layer: int, expert: int, hidden: torch.Tensor, mask: torch.Tensor,
                           top_k_weights: torch.Tensor, act_fn) -> tuple[torch.Tensor, torch.Tensor]:
        """A missed expert computed from its host-RAM record on the host device itself, after the others."""
        precision = self._host_precision()
        record = self.store.host_record(layer, expert, precision)
        if record is None:
            raise UserError("CPU execution of missed experts reads them from host RAM; use --store ram")
        return self._compute(record, self.layouts[precision], precision, hidden, mask, top_k_weights, act_fn)

    def _record(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> None:
        x = hidden.reshape(-1, hidden.shape[-1]).float()
        logits = F.linear(x, self.router_weights[layer]).cpu().numpy()
        self.routes[-1].append(RouteRecord(top_k_index.cpu().numpy(), top_k_weights.float().cpu().numpy(),
                                           logits, self._pending_lookahead[layer]))


def slot_key(layer: int, slot: int) -> tuple[str, int, int]:
    """The device buffer key of a slot."""
    return ("slot", layer, slot)
