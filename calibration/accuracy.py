"""`fatesim accuracy`: what the lossy options cost in model quality.

For a Hugging Face MoE model (the default trained models or a model folder) and a held-out text, each
variant is scored two ways against the lossless model:
- **perplexity** of the text, teacher-forced in windows of `window` tokens (each window is one prefill);
- **greedy agreement**: the lossless model greedily continues `num_prompts` prompts cut from the text by
  `generate_tokens` tokens; the variant is fed the same prompt (one prefill) and then the same tokens one
  decode step at a time, and we count the steps where its argmax equals the lossless token (teacher
  forcing keeps one early disagreement from deciding all later ones).

Variants:
- `lossless`: every expert through realrun's bf16 record round trip (`realrun.quant`): must reproduce the
  reference exactly (agreement 1.0, equal perplexity), which checks the harness itself;
- `int4`, `int2`: every routed expert quantised and dequantised with realrun's HQQ codec (no second quantiser);
- `fate-hybrid`: `sim.policies.precision.PrecisionPolicy("fate-hybrid", int2_rate)` chooses per layer step:
  in prefill the least popular experts go INT2 up to `int2_rate` of the routing mass, the rest INT4; decode INT4;
- `speculate`: the `speculate` preset's `OffloadController` (LRU cache of `budget`, speculative
  quasi-hidden-state prefetch) runs alongside the model; where it substitutes a resident speculated expert
  for a missing routed one, the model really computes the substitute. Transfers complete at once, which
  does not change which experts are substituted (that depends only on cache contents).

Routed experts are found as modules holding 3-D `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]
(transformers 5 Qwen2-MoE, DeepSeek-V2, ...); their router is the sibling `gate` module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sim.modelspec import ModelSpec
from traces.errors import UserError

VARIANTS = ("lossless", "int4", "int2", "fate-hybrid", "speculate")
FATE_INT2_RATE = {"qwen2_moe": 0.3, "qwen3_moe": 0.3, "deepseek": 0.5, "deepseek_v2": 0.5, "deepseek_v3": 0.5}
"""Fate's int2_rate per model family (arXiv 2502.12224): 0.3 for Qwen, 0.5 for DeepSeek."""


def resolve_model_dir(model: str) -> Path:
    """A model folder: a default model name (`traces.modelzoo`) or a Hugging Face model folder."""
    from traces.modelzoo import resolve_model

    return resolve_model(model)


@dataclass
class MoeLayer:
    """One MoE layer of a loaded model: its experts module and router weights."""

    experts: torch.nn.Module
    router_weight: torch.Tensor
    """[E, H] router matrix (logits = x @ W.T)."""
    original_forward: Callable[..., torch.Tensor]
    lossless: tuple[torch.Tensor, torch.Tensor]
    """The model's own (gate_up [E, 2I, H], down [E, H, I]) weights."""


def find_moe_layers(model: torch.nn.Module) -> list[MoeLayer]:
    """The routed-expert modules of `model` in layer order, with their routers."""
    layers = []
    for parent in model.modules():
        experts = getattr(parent, "experts", None)
        gate = getattr(parent, "gate", None)
        if experts is None or gate is None:
            continue
        gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
        weight = getattr(gate, "weight", None)
        if not (isinstance(gu, torch.Tensor) and gu.dim() == 3 and isinstance(down, torch.Tensor)
                and isinstance(weight, torch.Tensor)):
            continue
        layers.append(MoeLayer(experts, weight.detach(), experts.forward,
                               (gu.detach().clone(), down.detach().clone())))
    if not layers:
        raise UserError("found no routed experts with fused gate_up_proj/down_proj weights in this model; "
                        "accuracy supports transformers 5 Qwen2-MoE and DeepSeek-V2 style models")
    return layers


def quantised_bank(spec: ModelSpec, layer: MoeLayer, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All experts of `layer` packed in `precision` and unpacked again with realrun's codec."""
    from realrun.quant import Dequantizer, expert_layout, pack_expert, split_fused

    layout = expert_layout(spec, precision)
    dequantizer = Dequantizer(layout)
    gate_up, down = (w.clone() for w in layer.lossless)
    for e in range(gate_up.shape[0]):
        record = pack_expert(split_fused(layer.lossless[0][e], layer.lossless[1][e]), layout)
        gu, dn = dequantizer.unpack_into(record)
        gate_up[e].copy_(gu)
        down[e].copy_(dn)
    return gate_up, down


class Variant:
    """Installs one variant into the model's expert modules, and removes it again."""

    def __init__(self, name: str, spec: ModelSpec, layers: list[MoeLayer], *, budget: str, model_type: str,
                 bank_cache: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None):
        if name not in VARIANTS:
            raise UserError(f"unknown accuracy variant {name!r}; choose from {', '.join(VARIANTS)}")
        self.name = name
        self.spec = spec
        self.layers = layers
        self.banks: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        needed = {"lossless": ["bf16"], "int4": ["int4"], "int2": ["int2"], "fate-hybrid": ["int4", "int2"],
                  "speculate": ["bf16"]}[name]
        cache = {} if bank_cache is None else bank_cache  # quantising is the slow part: once per precision
        for precision in needed:
            if precision not in cache:
                cache[precision] = [quantised_bank(spec, layer, precision) for layer in layers]
            self.banks[precision] = cache[precision]
        self.int2_rate = FATE_INT2_RATE.get(model_type, 0.3)
        self.budget = budget
        self.controller: Any = None
        self.step = 0
        self.substituted = 0
        """Routed (token, expert) pairs computed by a substitute (speculate)."""
        self.routed = 0
        self.loaded: list[str] = ["lossless"] * len(layers)
        """What each layer's expert weights hold now ("lossless", a precision, or "mixed")."""

    def begin_sequence(self) -> None:
        """A new sequence starts: the speculate controller starts from an empty cache."""
        if self.name != "speculate":
            return
        from sim.hardware import load_profile
        from sim.policies.controller import OffloadController
        from sim.policies.presets import build_policy
        from sim.units import parse_budget

        budget = parse_budget(self.budget, self.spec) - self.spec.resident_bytes(0)
        self.controller = OffloadController(self.spec, build_policy("speculate"), budget,
                                            hw=load_profile("rtx3090-bound"))

    def begin_forward(self, num_tokens: int) -> None:
        if self.controller is not None:
            self.controller.start_forward(self.step, "prefill" if num_tokens > 1 else "decode", num_tokens)
        self.step += 1

    @contextmanager
    def installed(self) -> Iterator[None]:
        for index, layer in enumerate(self.layers):
            layer.experts.forward = self._forward_for(index, layer)
        try:
            yield
        finally:
            for layer in self.layers:
                layer.experts.forward = layer.original_forward
                layer.experts.gate_up_proj.data.copy_(layer.lossless[0])
                layer.experts.down_proj.data.copy_(layer.lossless[1])

    def _forward_for(self, index: int, layer: MoeLayer) -> Callable[..., torch.Tensor]:
        def forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
            phase = "prefill" if hidden.shape[0] > 1 else "decode"
            if self.name == "fate-hybrid":
                self._load_hybrid(index, phase, top_k_index)
            elif self.name == "speculate":
                top_k_index = self._speculate(index, hidden, top_k_index)
                self._load("bf16", index)
            else:
                self._load(next(iter(self.banks)), index)
            return layer.original_forward(hidden, top_k_index, top_k_weights)

        return forward

    def _load(self, precision: str, index: int) -> None:
        if self.loaded[index] == precision:
            return
        self.loaded[index] = precision
        gu, down = self.banks[precision][index]
        self.layers[index].experts.gate_up_proj.data.copy_(gu)
        self.layers[index].experts.down_proj.data.copy_(down)

    def _load_hybrid(self, index: int, phase: str, top_k_index: torch.Tensor) -> None:
        from sim.policies.precision import PrecisionPolicy

        ids, counts = torch.unique(top_k_index, return_counts=True)
        chosen = PrecisionPolicy("fate-hybrid", self.int2_rate).assign(phase, ids.tolist(), counts.tolist())
        self._load("int4", index)
        module = self.layers[index].experts
        if "int2" in chosen:
            self.loaded[index] = "mixed"
        int2_gu, int2_down = self.banks["int2"][index]
        for expert, precision in zip(ids.tolist(), chosen, strict=True):
            if precision == "int2":
                module.gate_up_proj.data[expert].copy_(int2_gu[expert])
                module.down_proj.data[expert].copy_(int2_down[expert])

    def _speculate(self, index: int, hidden: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
        from sim.policies.prediction import Signals

        ctl = self.controller
        n = hidden.shape[0]
        ahead = [layer.router_weight for layer in self.layers[index + 1: index + 1 + ctl.policy.lookahead]]
        probs = np.stack([F.softmax(F.linear(hidden.float(), w.float()), dim=-1).numpy() for w in ahead]) \
            if ahead else np.zeros((0, n, self.spec.num_experts))
        phase = "prefill" if n > 1 else "decode"
        for t in ctl.on_gate_input(index, Signals(step=self.step, phase=phase, num_tokens=n, lookahead_probs=probs)):
            ctl.on_transfer_started(t)
            ctl.on_transfer_done(t)
        ids, counts = np.unique(top_k_index.numpy(), return_counts=True)
        plan = ctl.on_route(index, ids.astype(np.int64), counts.astype(np.int64))
        for t in plan.loads:
            ctl.on_transfer_started(t)
            ctl.on_transfer_done(t)
        self.routed += int(top_k_index.numel())
        if not plan.substitutions:
            return top_k_index
        out = top_k_index.clone()
        for routed, substitute in plan.substitutions:
            mask = top_k_index == routed
            self.substituted += int(mask.sum())
            out[mask] = substitute
        return out


def _forward_logits(model: torch.nn.Module, variant: Variant | None, ids: torch.Tensor,
                    past: Any = None) -> tuple[torch.Tensor, Any]:
    if variant is not None:
        variant.begin_forward(ids.shape[1])
    out = model(input_ids=ids, past_key_values=past, use_cache=True)
    return out.logits[0].float(), out.past_key_values


def perplexity(model: torch.nn.Module, tokens: torch.Tensor, window: int, variant: Variant | None) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `tokens` [T], each one prefill."""
    total_nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window):
        chunk = tokens[start:start + window + 1]
        if len(chunk) < 2:
            break
        if variant is not None:
            variant.begin_sequence()
        logits, _ = _forward_logits(model, variant, chunk[:-1].unsqueeze(0))
        total_nll += float(F.cross_entropy(logits, chunk[1:], reduction="sum"))
        count += len(chunk) - 1
    return math.exp(total_nll / count)


def greedy_continuation(model: torch.nn.Module, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """The lossless model's greedy `n` tokens after `prompt` [P]."""
    logits, past = _forward_logits(model, None, prompt.unsqueeze(0))
    out = []
    for _ in range(n):
        token = int(logits[-1].argmax())
        out.append(token)
        logits, past = _forward_logits(model, None, torch.tensor([[token]]), past)
    return torch.tensor(out)


def agreement(model: torch.nn.Module, prompt: torch.Tensor, reference: torch.Tensor, variant: Variant) -> int:
    """Decode steps (of len(reference)) where the variant's argmax equals the reference token."""
    variant.begin_sequence()
    logits, past = _forward_logits(model, variant, prompt.unsqueeze(0))
    matches = 0
    for i, token in enumerate(reference.tolist()):
        matches += int(int(logits[-1].argmax()) == token)
        if i + 1 < len(reference):
            logits, past = _forward_logits(model, variant, torch.tensor([[token]]), past)
    return matches


def measure_accuracy(*, model: str, text_path: str | Path, max_tokens: int = 1024, generate_tokens: int = 32,
                     num_prompts: int = 4, prompt_tokens: int = 48, window: int = 256, budget: str = "50%",
                     variants: tuple[str, ...] = VARIANTS, threads: int = 1) -> dict[str, Any]:
    """Perplexity and greedy agreement of each variant; a JSON-ready dict (`rows`, inputs, reference).

    Runs with `threads` torch threads (default 1): the default models' matrices are small, and on a
    shared 2-core machine two spinning OpenMP threads made HQQ's quantiser 70x slower than one.
    """
    from calibration.microbench import torch_threads

    with torch_threads(threads), torch.inference_mode():
        return _measure(model=model, text_path=text_path, max_tokens=max_tokens, generate_tokens=generate_tokens,
                        num_prompts=num_prompts, prompt_tokens=prompt_tokens, window=window, budget=budget,
                        variants=variants)


def _measure(*, model: str, text_path: str | Path, max_tokens: int, generate_tokens: int, num_prompts: int,
             prompt_tokens: int, window: int, budget: str, variants: tuple[str, ...]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if max_tokens < 2 or generate_tokens < 1 or num_prompts < 1 or window < 1:
        raise UserError("--max-tokens must be >= 2 and --generate-tokens >= 1")
    for name in variants:
        if name not in VARIANTS:
            raise UserError(f"unknown accuracy variant {name!r}; choose from {', '.join(VARIANTS)}")
    path = Path(text_path)
    if not path.is_file():
        raise UserError(f"no text file at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    folder = resolve_model_dir(model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    spec = ModelSpec.from_config_file(folder)
    tokens = torch.tensor(tokenizer(text)["input_ids"][:max_tokens], dtype=torch.long)
    if len(tokens) < max(2 * num_prompts, 2):
        raise UserError(f"{path} has {len(tokens)} tokens; it needs at least {max(2 * num_prompts, 2)}")
    prompt_tokens = min(prompt_tokens, len(tokens) // num_prompts)
    layers = find_moe_layers(net)
    reference_ppl = perplexity(net, tokens, window, None)
    stride = len(tokens) // num_prompts
    prompts = [tokens[i * stride: i * stride + prompt_tokens] for i in range(num_prompts)]
    references = [greedy_continuation(net, p, generate_tokens) for p in prompts]
    rows = []
    banks: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name in variants:
        variant = Variant(name, spec, layers, budget=budget, model_type=spec.model_type, bank_cache=banks)
        with variant.installed():
            ppl = perplexity(net, tokens, window, variant)
            matches = sum(agreement(net, p, r, variant) for p, r in zip(prompts, references, strict=True))
        row = {"variant": name, "perplexity": ppl, "perplexity_ratio": ppl / reference_ppl,
               "greedy_agreement": matches / (num_prompts * generate_tokens)}
        if name == "fate-hybrid":
            row["int2_rate"] = variant.int2_rate
        if name == "speculate":
            row["budget"] = budget
            row["substituted_fraction"] = variant.substituted / max(1, variant.routed)
        rows.append(row)
    return {"model": str(folder), "text": str(path), "scored_tokens": int(len(tokens)),
            "reference_perplexity": reference_ppl, "window": window, "num_prompts": num_prompts,
            "prompt_tokens": prompt_tokens, "generate_tokens": generate_tokens, "rows": rows}


def format_accuracy(result: dict[str, Any]) -> str:
    """The accuracy result as a plain-text table."""
    lines = [f"model {result['model']}, text {result['text']} ({result['scored_tokens']} tokens); "
             f"lossless perplexity {result['reference_perplexity']:.3f}",
             f"{'variant':<12} {'perplexity':>10} {'vs lossless':>11} {'greedy agreement':>17}  notes"]
    for row in result["rows"]:
        notes = ""
        if "int2_rate" in row:
            notes = f"int2_rate {row['int2_rate']}"
        if "substituted_fraction" in row:
            notes = f"budget {row['budget']}, {row['substituted_fraction']:.1%} of routed experts substituted"
        lines.append(f"{row['variant']:<12} {row['perplexity']:>10.3f} {row['perplexity_ratio']:>10.3f}x "
                     f"{row['greedy_agreement']:>16.1%}  {notes}")
    return "\n".join(lines)
