"""Record a routing trace by running a Hugging Face MoE model over a prompt set.

For each prompt: one prefill forward over the prompt's tokens, then greedy decoding with the KV cache for
`max_new_tokens` steps. Every generated token is fed back through one decode forward, so a sequence holds
P prefill positions and `max_new_tokens` decode positions, and the decode positions' token ids are exactly
the first `max_new_tokens` tokens that `model.generate(do_sample=False)` would return. Decoding does not
stop at EOS: every sequence has the same number of decode positions.

What is captured per forward and MoE layer comes from forward hooks on the model's router modules
(`traces.routercapture`): the routed ids and weights as the model routed them (the architecture's own
scoring: softmax, sigmoid, group-limited top-k, correction bias), the router logits, optionally the gate
inputs, and the look-ahead logits for d = 1..D — the router of MoE layer l+d called on the gate input of
layer l (zeros where l+d >= L). By default (`--dtype auto`) the model runs in float32 on a CPU and in its
stored dtype on CUDA. With a memory budget the model runs offloaded, through realrun's streaming loader
and engine (`realrun.record`): models larger than memory record too. Letters: T positions, L MoE layers,
k top-k, E experts, H hidden size, D look-ahead.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from traces.errors import UserError
from traces.format import Trace, TraceModelConfig, utc_now_iso, write_trace
from traces.model_configs import routing_config
from traces.modelzoo import resolve_model
from traces.promptset import prompt_token_ids, prompts_identity
from traces.routercapture import RouterCapture, check_architecture

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
"""`--dtype` values: the compute dtype of a recording (and of realrun)."""
_DTYPE_NAMES = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32",
                "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def stored_dtype(folder: Path) -> str:
    """The weight dtype named in the folder's config.json ("dtype", or v4's "torch_dtype"); float32 if absent."""
    raw = json.loads((folder / "config.json").read_text())
    return _DTYPE_NAMES.get(str(raw.get("dtype") or raw.get("torch_dtype") or "float32"), "float32")


def trace_model_config(model: Any, routers: list[tuple[int, Any]], dtype: str) -> TraceModelConfig:
    """The routing-relevant shape of a loaded model, read from its router modules and its config.

    `dtype` is the stored weight dtype (the loaded model may run in another one, e.g. float32 on CPU). The
    expert intermediate size comes from the config (`traces.model_configs.routing_config`), not from the
    experts module, which an offloaded model has replaced.
    """
    config = model.config
    model_type = check_architecture(config)
    first_router = routers[0][1]
    num_shared, shared_size = 0, 0
    if model_type == "qwen2_moe" and config.shared_expert_intermediate_size > 0:
        num_shared, shared_size = 1, int(config.shared_expert_intermediate_size)
    elif model_type in ("deepseek_v2", "deepseek_v3") and config.n_shared_experts:
        num_shared = int(config.n_shared_experts)
        shared_size = int(config.moe_intermediate_size) * num_shared
    return TraceModelConfig(
        architecture=model_type,
        num_layers=int(config.num_hidden_layers),
        moe_layer_indices=tuple(index for index, _ in routers),
        num_experts=int(first_router.num_experts),
        top_k=int(first_router.top_k),
        num_shared_experts=num_shared,
        hidden_size=int(config.hidden_size),
        expert_intermediate_size=routing_config(config.to_dict()).expert_intermediate_size,
        shared_expert_intermediate_size=shared_size,
        dtype=dtype,
    )


def compute_dtype_name(choice: str, device: str, stored: str) -> str:
    """The dtype a recording (or realrun) computes in for `--dtype choice`: "auto" is float32 on a CPU (bf16
    matmuls are several times slower on CPUs without AVX512-BF16/AMX; on this project's AVX512-BF16 VM bf16 is
    the faster one: `realrun.streaming.resolve_dtype` has the figures) and the stored dtype on CUDA."""
    if choice not in DTYPE_CHOICES:
        raise UserError(f"--dtype {choice!r} is not one of {', '.join(DTYPE_CHOICES)}")
    if choice != "auto":
        return choice
    return "float32" if device == "cpu" else stored


def _check_device(device: str) -> None:
    import torch

    if device not in ("cpu", "cuda"):
        raise UserError(f"device {device!r} is not supported; use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but no CUDA GPU is visible; use --device cpu")


def _config(folder: Path) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, OSError) as err:
        raise UserError(f"cannot read the model config in {folder}: {str(err).splitlines()[0]}") from None
    check_architecture(config)
    return config


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""A model folder with none of these has no tokenizer (AutoTokenizer would make an empty one from the config)."""


def tokenizer_of(folder: Path) -> Any:
    """The folder's tokenizer, or None when it has none (prompts must then be given as token ids)."""
    from transformers import AutoTokenizer

    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError):
        return None


def load_model(model: str, device: str, dtype: str = "auto") -> tuple[Any, Any, Path]:
    """(model in eval mode on `device`, tokenizer or None, folder) for an embedded name or a local folder,
    with every weight in memory (`from_pretrained`), in the compute dtype of `--dtype dtype`."""
    _check_device(device)
    folder = resolve_model(model)
    _config(folder)
    return _in_memory(folder, compute_dtype_name(dtype, device, stored_dtype(folder)), device), \
        tokenizer_of(folder), folder


def _in_memory(folder: Path, compute: str, device: str) -> Any:
    """Every weight of the folder's model in memory (`from_pretrained`), in eval mode on `device`. With
    transformers' eager experts loop, the order realrun's engine reproduces: a recording with and without
    --memory-budget gives the same bits (the default grouped_mm sums in another order)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, compute),
                                                experts_implementation="eager").to(device).eval()


def record_trace(model: str, prompts_path: Path, out: Path, *, max_new_tokens: int = 32, lookahead: int = 2,
                 gate_inputs: bool = False, device: str = "cpu", progress: bool = True,
                 memory_budget: str | None = None, dtype: str = "auto") -> Trace:
    """Run `model` over the prompts of `prompts_path`, write the routing trace to `out` and return it.

    `max_new_tokens`: decode forwards per prompt (greedy); `lookahead`: depth D of the look-ahead logits
    (0: none); `gate_inputs`: also store the router inputs (T x L x H float16); `device`: "cpu" or "cuda";
    `dtype`: compute dtype (`compute_dtype_name`). `memory_budget` (e.g. "10%", "6GiB"): run the model as
    realrun does, its routed experts streamed from the checkpoint into an offload tier and served on demand
    within that fast-memory budget, for models larger than memory (`realrun.record`); None: load every
    weight with `from_pretrained`. Both give the same trace: experts are computed by the same operations.
    """
    import torch
    import transformers

    from traces.paths import check_output

    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if lookahead < 0:
        raise UserError(f"lookahead must be >= 0, got {lookahead}")
    check_output(out, inputs=[prompts_path], what="--out")
    identity = prompts_identity(prompts_path)
    _check_device(device)
    folder = resolve_model(model)
    config = _config(folder)
    weights_dtype = stored_dtype(folder)
    compute = compute_dtype_name(dtype, device, weights_dtype)
    prompt_ids = prompt_token_ids(prompts_path, tokenizer_of(folder))
    source = {
        "kind": "recorded", "device": device, "transformers": transformers.__version__,
        "torch": torch.__version__, "max_new_tokens": max_new_tokens, "lookahead": lookahead,
        "gate_inputs": gate_inputs, "model_path": str(folder), "compute_dtype": compute,
        "decoding": "greedy with KV cache; one decode forward per generated token; no stop at EOS",
        "capture": "forward hooks on the router modules (routed ids/weights/logits as the model computed them)",
        "assumptions": ["prefill = one forward over the whole prompt; sequences run one at a time"],
    }
    if memory_budget is None:
        hf_model = _in_memory(folder, compute, device)
        source["loader"] = "from_pretrained: every weight in memory"
        cols, cfg = _capture(hf_model, prompt_ids, model, max_new_tokens=max_new_tokens, lookahead=lookahead,
                             gate_inputs=gate_inputs, device=device, progress=progress, weights_dtype=weights_dtype)
    else:
        # The one place traces runs realrun: a model larger than memory is only runnable offloaded.
        from realrun.record import offloaded_model

        kv_tokens = max(len(p) for p in prompt_ids) + max_new_tokens + 1
        with offloaded_model(folder, device=device, dtype=compute, memory_budget=memory_budget,
                             kv_tokens=kv_tokens) as offloaded:
            source["loader"] = offloaded.loader
            cols, cfg = _capture(offloaded.model, prompt_ids, model, max_new_tokens=max_new_tokens,
                                 lookahead=lookahead, gate_inputs=gate_inputs, device=device, progress=progress,
                                 weights_dtype=weights_dtype, on_forward=offloaded.on_forward)
    hf_config = json.loads(config.to_json_string(use_diff=False))
    hf_config["dtype"] = weights_dtype  # the stored dtype, not the one this run computed in
    hf_config.pop("torch_dtype", None)

    def cat(name: str, axis: int = 0) -> np.ndarray | None:
        return np.concatenate(cols[name], axis=axis) if cols[name] else None

    trace = Trace(
        model=model, model_config=cfg, source=source, prompts=identity, created=utc_now_iso(),
        token_ids=cat("token_ids"), seq_ids=cat("seq_ids"), positions=cat("positions"),
        is_prefill=cat("is_prefill"), topk_ids=cat("topk_ids"), topk_weights=cat("topk_weights"),
        router_logits=cat("router_logits"), lookahead_logits=cat("lookahead_logits", axis=1),
        gate_inputs=cat("gate_inputs"), hf_config=hf_config,
    )
    write_trace(trace, out)
    return trace


def _capture(hf_model: Any, prompt_ids: list[list[int]], name: str, *, max_new_tokens: int, lookahead: int,
             gate_inputs: bool, device: str, progress: bool,
             weights_dtype: str, on_forward: Callable[[int, str, int], None] | None = None,
             ) -> tuple[dict[str, list[np.ndarray]], TraceModelConfig]:
    """Every forward's routing of greedy runs of `hf_model` over `prompt_ids`, as trace columns;
    `on_forward(step, phase, tokens)` is called before each forward (an offloading engine's clock)."""
    import torch
    from tqdm import tqdm

    capture = RouterCapture(hf_model)
    cfg = trace_model_config(hf_model, capture.routers, weights_dtype)
    num_moe = len(capture.routers)
    depth = lookahead
    cols: dict[str, list[np.ndarray]] = {name: [] for name in (
        "token_ids", "seq_ids", "positions", "is_prefill", "topk_ids", "topk_weights", "router_logits",
        "lookahead_logits", "gate_inputs")}

    def take(tokens: list[int], seq: int, start: int, prefill: bool) -> None:
        """Store the routing of the forward just run over `tokens` (positions start.. of sequence seq)."""
        calls = capture.take_last()
        n = len(tokens)
        cols["token_ids"].append(np.asarray(tokens, dtype=np.int32))
        cols["seq_ids"].append(np.full(n, seq, dtype=np.int32))
        cols["positions"].append(np.arange(start, start + n, dtype=np.int32))
        cols["is_prefill"].append(np.full(n, int(prefill), dtype=np.uint8))
        cols["topk_ids"].append(np.stack([c.ids.cpu().numpy() for c in calls], axis=1).astype(np.int16))
        cols["topk_weights"].append(
            np.stack([c.weights.float().cpu().numpy() for c in calls], axis=1).astype(np.float16))
        cols["router_logits"].append(
            np.stack([c.logits.float().cpu().numpy() for c in calls], axis=1).astype(np.float16))
        if gate_inputs:
            cols["gate_inputs"].append(
                np.stack([c.gate_input.float().cpu().numpy() for c in calls], axis=1).astype(np.float16))
        if depth:
            ahead = np.zeros((depth, n, num_moe, cfg.num_experts), dtype=np.float16)  # [D, N, L, E]
            for d in range(1, depth + 1):
                for layer in range(num_moe - d):
                    logits = capture.router_logits_on(layer + d, calls[layer].gate_input)
                    ahead[d - 1, :, layer] = logits.float().cpu().numpy()
            cols["lookahead_logits"].append(ahead)

    with capture, torch.no_grad():
        bar = tqdm(prompt_ids, desc=f"recording {name}", unit="prompt", file=sys.stderr, disable=not progress)
        step = 0

        def starting(phase: str, tokens: int) -> None:
            nonlocal step
            if on_forward is not None:
                on_forward(step, phase, tokens)
            step += 1

        for seq, ids in enumerate(bar):
            capture.clear()
            starting("prefill", len(ids))
            out_fwd = hf_model(input_ids=torch.tensor([ids], device=device), use_cache=True)
            take(ids, seq, 0, prefill=True)
            past = out_fwd.past_key_values
            next_token = int(out_fwd.logits[0, -1].argmax())
            for new in range(max_new_tokens):
                starting("decode", 1)
                out_fwd = hf_model(input_ids=torch.tensor([[next_token]], device=device), past_key_values=past,
                                   use_cache=True)
                take([next_token], seq, len(ids) + new, prefill=False)
                past = out_fwd.past_key_values
                next_token = int(out_fwd.logits[0, -1].argmax())
    return cols, cfg
