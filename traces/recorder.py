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
layer l (zeros where l+d >= L). On CPU the model runs in float32 (bf16 matmuls are slow there); on CUDA
in its stored dtype. Letters: T positions, L MoE layers, k top-k, E experts, H hidden size, D look-ahead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from traces.errors import UserError
from traces.format import Trace, TraceModelConfig, utc_now_iso, write_trace
from traces.modelzoo import resolve_model
from traces.promptset import load_prompts, prompts_identity
from traces.routercapture import RouterCapture, check_architecture

_DTYPE_NAMES = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32",
                "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def stored_dtype(folder: Path) -> str:
    """The weight dtype named in the folder's config.json ("dtype", or v4's "torch_dtype"); float32 if absent."""
    raw = json.loads((folder / "config.json").read_text())
    return _DTYPE_NAMES.get(str(raw.get("dtype") or raw.get("torch_dtype") or "float32"), "float32")


def trace_model_config(model: Any, routers: list[tuple[int, Any]], dtype: str) -> TraceModelConfig:
    """The routing-relevant shape of a loaded model, read from its config and its router/expert modules.

    `dtype` is the stored weight dtype (the loaded model may run in another one, e.g. float32 on CPU).
    """
    config = model.config
    model_type = check_architecture(config)
    first_router = routers[0][1]
    first_moe = model.model.layers[routers[0][0]].mlp
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
        expert_intermediate_size=int(first_moe.experts.intermediate_dim),
        shared_expert_intermediate_size=shared_size,
        dtype=dtype,
    )


def load_model(model: str, device: str) -> tuple[Any, Any, Path]:
    """(model in eval mode on `device`, tokenizer, folder) for an embedded name or a local folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if device not in ("cpu", "cuda"):
        raise UserError(f"device {device!r} is not supported; use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    folder = resolve_model(model)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, OSError) as err:
        raise UserError(f"cannot read the model config in {folder}: {str(err).splitlines()[0]}") from None
    check_architecture(config)
    dtype = torch.float32 if device == "cpu" else "auto"
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return hf_model, tokenizer, folder


def _prompt_ids(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    out = []
    for n, text in enumerate(prompts):
        ids = tokenizer(text)["input_ids"]
        if not ids:
            raise UserError(f"prompt {n} tokenizes to nothing; remove it from the prompt file")
        out.append(list(ids))
    return out


def record_trace(model: str, prompts_path: Path, out: Path, *, max_new_tokens: int = 32, lookahead: int = 2,
                 gate_inputs: bool = False, device: str = "cpu", progress: bool = True) -> Trace:
    """Run `model` over the prompts of `prompts_path`, write the routing trace to `out` and return it.

    `max_new_tokens`: decode forwards per prompt (greedy); `lookahead`: depth D of the look-ahead logits
    (0: none); `gate_inputs`: also store the router inputs (T x L x H float16); `device`: "cpu" or "cuda".
    """
    import torch
    import transformers
    from tqdm import tqdm

    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if lookahead < 0:
        raise UserError(f"lookahead must be >= 0, got {lookahead}")
    folder_out = Path(out).parent
    if not folder_out.is_dir():
        raise UserError(f"cannot write {out}: folder {folder_out} does not exist; create it first")
    prompts = load_prompts(prompts_path)
    identity = prompts_identity(prompts_path)
    hf_model, tokenizer, folder = load_model(model, device)
    prompt_ids = _prompt_ids(tokenizer, prompts)

    capture = RouterCapture(hf_model)
    weights_dtype = stored_dtype(folder)
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
        bar = tqdm(prompt_ids, desc=f"recording {model}", unit="prompt", file=sys.stderr, disable=not progress)
        for seq, ids in enumerate(bar):
            capture.clear()
            out_fwd = hf_model(input_ids=torch.tensor([ids], device=device), use_cache=True)
            take(ids, seq, 0, prefill=True)
            past = out_fwd.past_key_values
            next_token = int(out_fwd.logits[0, -1].argmax())
            for step in range(max_new_tokens):
                out_fwd = hf_model(input_ids=torch.tensor([[next_token]], device=device), past_key_values=past,
                                   use_cache=True)
                take([next_token], seq, len(ids) + step, prefill=False)
                past = out_fwd.past_key_values
                next_token = int(out_fwd.logits[0, -1].argmax())

    def cat(name: str, axis: int = 0) -> np.ndarray | None:
        return np.concatenate(cols[name], axis=axis) if cols[name] else None

    source = {
        "kind": "recorded", "device": device, "transformers": transformers.__version__,
        "torch": torch.__version__, "max_new_tokens": max_new_tokens, "lookahead": depth,
        "gate_inputs": gate_inputs, "model_path": str(folder),
        "compute_dtype": str(next(hf_model.parameters()).dtype).removeprefix("torch."),
        "decoding": "greedy with KV cache; one decode forward per generated token; no stop at EOS",
        "capture": "forward hooks on the router modules (routed ids/weights/logits as the model computed them)",
        "assumptions": ["prefill = one forward over the whole prompt; sequences run one at a time"],
    }
    hf_config = json.loads(hf_model.config.to_json_string(use_diff=False))
    hf_config["dtype"] = weights_dtype  # the stored dtype, not the one this run computed in
    trace = Trace(
        model=model, model_config=cfg, source=source, prompts=identity, created=utc_now_iso(),
        token_ids=cat("token_ids"), seq_ids=cat("seq_ids"), positions=cat("positions"),
        is_prefill=cat("is_prefill"), topk_ids=cat("topk_ids"), topk_weights=cat("topk_weights"),
        router_logits=cat("router_logits"), lookahead_logits=cat("lookahead_logits", axis=1),
        gate_inputs=cat("gate_inputs"), hf_config=hf_config,
    )
    write_trace(trace, out)
    return trace
