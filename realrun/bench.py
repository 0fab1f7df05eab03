"""`make bench-real`: realrun's lod, lru and fate against transformers/accelerate offloading, one run.

The model has Qwen1.5-MoE-A2.7B's MoE shapes (hidden 2048, 60 routed experts of intermediate 1408, top-4,
one shared expert of 4 x 1408, 16 heads) with fewer decoder layers, a 32k vocabulary and random weights:
timing does not need trained weights. It is generated once (seeded) into a cache folder, never into git.

Contenders, all on the same prompts (random token ids, seeded), greedy, same number of new tokens:
- realrun `lod`, `lru`, `fate`: experts in an O_DIRECT disk store, fast-memory budget `--memory-budget`;
- `accelerate-disk`: `from_pretrained(device_map="auto", max_memory={"cpu": budget}, offload_folder=...)`:
  what fits the budget in RAM, the rest of the decoder layers offloaded to disk (safetensors memory maps,
  read through the page cache; the files are evicted from the cache with POSIX_FADV_DONTNEED first);
- `in-ram`: the plain model with every weight in RAM (ignores the budget: the no-offloading bound).

With `--device cuda` the realrun contenders compute on the GPU with the slow tier in pinned host RAM
(`--store ram`, the Fate setting) or on disk, `accelerate-cpu` keeps what fits the budget on the GPU and
offloads the rest to CPU RAM (`max_memory={0: budget, "cpu": ...}`), and `in-ram` is the model wholly on
the GPU. Without a GPU none of this can run; it is written, not yet measured.

Each contender gets one untimed warm-up forward; tokens/s and ratios to `lod` are printed as a Markdown
table and written as JSON. Threads: torch runs on 1 intra-op thread for every contender (on a small shared
machine OpenMP worker threads that get descheduled make element-wise ops 20x slower; 1 thread is fair to
all and stable).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import click
import torch

from realrun.runner import greedy_generate, storage_precisions
from realrun.session import Prompts, load_model, run_streamed
from realrun.streaming import load_streaming
from sim.modelspec import ModelSpec
from sim.policies.presets import build_policy
from sim.units import parse_budget
from traces.atomic import atomic_output

DEFAULT_CACHE = Path(os.environ.get("FATESIM_CACHE", Path.home() / ".cache" / "fatesim"))


def qwen_shaped_config(num_layers: int, **overrides: Any) -> dict[str, Any]:
    """Qwen1.5-MoE-A2.7B's config with `num_layers` decoder layers and a 32k vocabulary, float32
    (`overrides`: smaller shapes for the tests of this script)."""
    return dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_hidden_layers=num_layers, num_attention_heads=16,
        num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
        max_position_embeddings=4096, rope_theta=1000000.0, tie_word_embeddings=False, dtype="float32",
    ) | overrides


def generate_model(folder: Path, num_layers: int, seed: int = 0, **overrides: Any) -> Path:
    """Write the random Qwen-shaped model to `folder` (once; an existing complete folder is reused)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    if (folder / "config.json").exists() and (folder / "model.safetensors.index.json").exists():
        return folder
    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**qwen_shaped_config(num_layers, **overrides))).eval()
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="1GB")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)  # the folder appears complete or not at all
    return folder


def random_prompts(num_prompts: int, prompt_tokens: int, vocab: int, seed: int = 0) -> Prompts:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (prompt_tokens,), generator=g).tolist() for _ in range(num_prompts)]
    return Prompts(ids, f"random-{num_prompts}x{prompt_tokens}", f"seed-{seed}")


def _dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (no AVX512-BF16 here: bf16 matmuls are ~5x slower), bfloat16 on a GPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _rates(gen) -> dict[str, float]:
    prefill_s, decode_s = sum(gen.seconds("prefill")), sum(gen.seconds("decode"))
    return {"prefill_tokens_per_s": gen.tokens("prefill") / prefill_s,
            "decode_tokens_per_s": gen.tokens("decode") / decode_s}


def _drop_page_cache(folder: Path) -> None:
    """Evict `folder`'s files from the page cache so the first reads really go to the disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def bench_accelerate(folder: Path, prompts: Prompts, new_tokens: int, budget_bytes: int, cache: Path,
                     device: torch.device) -> dict:
    """accelerate's big-model inference: fast memory up to the budget, the remaining layers offloaded (to
    disk on a CPU device, to CPU RAM on a GPU)."""
    from transformers import AutoModelForCausalLM

    offload = cache / "accelerate-offload"
    shutil.rmtree(offload, ignore_errors=True)
    if device.type == "cuda":
        max_memory: dict[Any, int] = {device.index or 0: budget_bytes, "cpu": 1 << 40}
        dtype = torch.bfloat16
    else:
        max_memory, dtype = {"cpu": budget_bytes}, torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="auto", max_memory=max_memory,
                                                 offload_folder=offload, experts_implementation="eager").eval()
    placement = sorted({str(v) for v in model.hf_device_map.values()})
    first = next(model.parameters()).device if device.type == "cuda" else torch.device("cpu")
    with torch.inference_mode():
        model(input_ids=torch.tensor([prompts.token_ids[0][:8]], device=first))  # warm-up, untimed
    if offload.exists():
        _drop_page_cache(offload)
    gen = greedy_generate(model, prompts.token_ids, new_tokens, first)
    del model
    shutil.rmtree(offload, ignore_errors=True)
    return {**_rates(gen), "placement": placement, "generated": gen.generated}


def bench_in_ram(folder: Path, prompts: Prompts, new_tokens: int, device: torch.device) -> dict:
    """The plain model wholly in fast memory: the bound no offloading can beat."""
    model = load_model(folder, device, _dtype(device))
    with torch.inference_mode():
        model(input_ids=torch.tensor([prompts.token_ids[0][:8]], device=device))
    gen = greedy_generate(model, prompts.token_ids, new_tokens, device)
    return {**_rates(gen), "generated": gen.generated}


def bench_realrun(folder: Path, prompts: Prompts, new_tokens: int, policy: str, budget_bytes: int,
                  cache: Path, device: torch.device, store: str) -> dict:
    streamed = load_streaming(folder, device, str(_dtype(device)).removeprefix("torch."))
    pol = build_policy(policy)
    tag = "-".join(storage_precisions(pol))  # lod and lru read bf16 from the checkpoint; fate has its own store
    try:
        result, gen = run_streamed(streamed, prompts, model_name=folder.name, policy=pol, memory_budget=budget_bytes,
                                   device=device, store=store, max_new_tokens=new_tokens,
                                   store_path=cache / f"store-{folder.name}{'-cuda' if device.type == 'cuda' else ''}-{tag}.bin",
                                   optimize_quant=False)
    finally:
        streamed.checkpoint.close()
    keep = ("prefill_tokens_per_s", "decode_tokens_per_s", "hit_rate", "prefetch_precision", "prefetch_recall",
            "gpu_stall_s", "link_busy_fraction", "bytes_transferred", "profile")
    return {**{k: result[k] for k in keep}, "generated": gen.generated}


def run_bench(*, num_layers: int, num_prompts: int, prompt_tokens: int, new_tokens: int, budget: str,
              cache: Path, contenders: tuple[str, ...], device: str = "cpu", store: str = "disk",
              model_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every contender on the same model, prompts and budget; returns the results with ratios to lod."""
    dev = torch.device(device)
    torch.set_num_threads(1)
    cache.mkdir(parents=True, exist_ok=True)
    name = f"qwen-moe-shapes-L{num_layers}" + ("-test" if model_overrides else "")
    folder = generate_model(cache / name, num_layers, **(model_overrides or {}))
    spec = ModelSpec.from_config_file(folder)
    prompts = random_prompts(num_prompts, prompt_tokens, spec.vocab_size)
    budget_bytes = parse_budget(budget, spec, prompt_tokens + new_tokens)
    results: dict[str, Any] = {}
    for name in contenders:
        start = time.perf_counter()
        if name in ("lod", "lru", "fate"):
            results[name] = bench_realrun(folder, prompts, new_tokens, name, budget_bytes, cache, dev, store)
        elif name in ("accelerate-disk", "accelerate-cpu"):
            results[name] = bench_accelerate(folder, prompts, new_tokens, budget_bytes, cache, dev)
        elif name == "in-ram":
            results[name] = bench_in_ram(folder, prompts, new_tokens, dev)
        else:
            raise click.BadParameter(f"unknown contender {name}")
        results[name]["wall_s"] = time.perf_counter() - start
    base = results.get("lod")
    for r in results.values():
        if base:
            r["prefill_vs_lod"] = r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
            r["decode_vs_lod"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return {
        "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": 1, "device": device,
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None, "store": store},
        "model": {"folder": str(folder), "moe_layers": spec.num_moe_layers, "experts": spec.num_experts,
                  "top_k": spec.top_k, "hidden": spec.hidden_size, "expert_intermediate": spec.expert_intermediate_size,
                  "dtype": spec.dtype, "expert_bytes": {p: spec.expert_bytes(p) for p in ("bf16", "int4", "int2")}},
        "workload": {"prompts": num_prompts, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                     "budget": budget, "budget_bytes": budget_bytes},
        "results": results,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = ["| contender | prefill tok/s | decode tok/s | prefill vs lod | decode vs lod | hit rate |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in report["results"].items():
        hit = f"{r['hit_rate']:.3f}" if "hit_rate" in r else "–"
        lines.append(f"| {name} | {r['prefill_tokens_per_s']:.2f} | {r['decode_tokens_per_s']:.3f} | "
                     f"{r.get('prefill_vs_lod', float('nan')):.2f}x | {r.get('decode_vs_lod', float('nan')):.2f}x | {hit} |")
    return "\n".join(lines)


@click.command()
@click.option("--layers", type=click.IntRange(min=2), default=3, show_default=True, help="Decoder (= MoE) layers.")
@click.option("--prompts", "num_prompts", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=2), default=12, show_default=True)
@click.option("--budget", default="25%", show_default=True, help="Fast-memory budget, as for `fatesim realrun`.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_CACHE, show_default=True,
              help="Folder for the generated model, the expert stores and accelerate's offload files.")
@click.option("--contenders", default=None,
              help="Comma-separated [default: lod,lru,fate,accelerate-disk,in-ram; accelerate-cpu on cuda].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--store", type=click.Choice(["disk", "ram"]), default="disk", show_default=True,
              help="realrun's slow tier.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the JSON here.")
def main(layers: int, num_prompts: int, prompt_tokens: int, new_tokens: int, budget: str, cache: Path,
         contenders: str | None, device: str, store: str, out: Path | None) -> None:
    """Benchmark realrun's lod/lru/fate against accelerate's offloading on a Qwen-shaped model."""
    if contenders is None:
        contenders = "lod,lru,fate," + ("accelerate-cpu" if device == "cuda" else "accelerate-disk") + ",in-ram"
    report = run_bench(num_layers=layers, num_prompts=num_prompts, prompt_tokens=prompt_tokens,
                       new_tokens=new_tokens, budget=budget, cache=cache, device=device, store=store,
                       contenders=tuple(c.strip() for c in contenders.split(",") if c.strip()))
    click.echo(format_table(report))
    if out is not None:
        with atomic_output(out) as tmp:
            tmp.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
