"""CUDA timing and overlap: copies and stalls timed by CUDA events, CPU experts beside the GPU. Skipped
without a CUDA GPU (run by `make gpu-check`)."""

from __future__ import annotations

import copy
import dataclasses
import time

import pytest
import torch

from realrun.device import CudaDevice, PendingTimes
from realrun.loader import Copy, Loader
from realrun.quant import expert_layout
from realrun.runner import greedy_generate
from realrun.session import run_offloaded
from realrun.store import RamStore
from sim.modelspec import get_model_spec
from sim.policies.presets import build_policy
from tests.realrun.conftest import NEW_TOKENS, PROMPTS, tiny_qwen

pytestmark = pytest.mark.cuda


def test_event_clock_is_the_host_clock() -> None:
    """An event recorded on an idle stream maps to a perf_counter instant between the host's readings."""
    dev = CudaDevice(torch.device("cuda"))
    torch.cuda.synchronize()
    before = time.perf_counter()
    event = dev.record(dev.compute)
    event.synchronize()
    after = time.perf_counter()
    assert before - 1e-3 <= dev.time_of(event) <= after + 1e-3


def test_copy_time_is_the_transfer_not_its_enqueue() -> None:
    """A pinned-RAM copy is asynchronous: the I/O thread enqueues it in microseconds. Its busy time must be
    the device's copy time (events), i.e. close to a synchronised host measurement of the same copy."""
    spec = dataclasses.replace(get_model_spec("qwen1.5-moe-a2.7b"), dtype="bfloat16")  # 17 MB per bf16 expert
    layout = expert_layout(spec, "bf16")
    records = torch.randint(0, 255, (2, 2, layout.nbytes), dtype=torch.uint8)
    store = RamStore({"bf16": layout}, 2, 2, lambda layer, expert, _p: records[layer, expert], pin_memory=True)
    dev = CudaDevice(torch.device("cuda"))
    slots = [torch.empty(layout.nbytes, dtype=torch.uint8, device="cuda") for _ in range(4)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    slots[0].copy_(store.host_record(0, 0, "bf16"), non_blocking=True)
    torch.cuda.synchronize()
    host_s = time.perf_counter() - t0
    with Loader(store, dev) as loader:
        copies = [loader.submit(Copy(i // 2, i % 2, "bf16", slots[i], "demand", key=i)) for i in range(4)]
        for c in copies:
            loader.wait(c)
    per_copy = loader.busy_s / 4
    assert per_copy >= 0.5 * host_s, (per_copy, host_s)
    assert layout.nbytes / per_copy < 1e12  # no host link moves 1 TB/s
    for i in range(4):
        assert torch.equal(slots[i].cpu(), records[i // 2, i % 2])


@pytest.mark.parametrize("preset", ["lod", "cpu-exec"])
def test_run_metrics_come_from_events(preset: str) -> None:
    """A CUDA run reports stalls and link time from events: within the run, and the clock says so."""
    dev = torch.device("cuda")
    result, _ = run_offloaded(tiny_qwen().to(dev), PROMPTS, model_name="tiny", policy=build_policy(preset),
                              memory_budget="40%", device=dev, store="ram", max_new_tokens=NEW_TOKENS)
    assert result["io"]["clock"] == "cuda-events"
    assert 0 <= result["gpu_stall_s"] <= result["makespan_s"]
    if preset == "lod":
        assert result["io"]["busy_s"] > 0 and result["io"]["copies"] > 0


def test_cpu_experts_run_on_the_worker_and_match_the_plain_model() -> None:
    """cpu-exec on CUDA: missed experts are computed by the worker thread from host RAM, in parallel; tokens
    equal the plain model's (CPU and GPU float32 kernels differ in the last bits, hence the tolerance)."""
    dev = torch.device("cuda")
    plain = tiny_qwen().to(dev)
    ref = greedy_generate(plain, PROMPTS.token_ids, NEW_TOKENS, dev, keep_logits=True)
    engines = []
    result, gen = run_offloaded(copy.deepcopy(plain), PROMPTS, model_name="tiny", policy=build_policy("cpu-exec"),
                                memory_budget="40%", device=dev, store="ram", max_new_tokens=NEW_TOKENS,
                                keep_logits=True, engine_hook=engines.append)
    assert engines[0].cpu is not None and engines[0].cpu.spans  # the worker computed experts
    assert gen.generated == ref.generated
    for ours, theirs in zip(gen.logits, ref.logits, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_pending_times_settle_after_sync() -> None:
    dev = CudaDevice(torch.device("cuda"))
    a = torch.randn(2048, 2048, device="cuda")
    start = dev.record(dev.compute)
    for _ in range(20):
        a = a @ a / 2048
    end = dev.record(dev.compute)
    got = []
    times = PendingTimes(dev)
    times.add(start, end, lambda s, e: got.append(e - s))
    torch.cuda.synchronize()
    times.settle()
    assert len(got) == 1 and got[0] > 0
