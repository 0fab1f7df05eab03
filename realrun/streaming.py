"""Build a transformers MoE model from a checkpoint folder without ever holding its routed experts.

`load_streaming(folder, device, dtype)` does what `AutoModelForCausalLM.from_pretrained` does for
everything but the routed experts, as accelerate's big-model inference and llama.cpp's mmap loading do:

1. the skeleton is built on the meta device (no memory, no random init) from config.json with
   transformers' eager experts loop;
2. every other parameter and persistent buffer (embeddings, attention, norms, routers, shared experts,
   lm_head unless tied) is read from the safetensors files one tensor at a time and put on the compute
   device in the dtype from_pretrained would give it (the compute dtype, or float32 for the modules a
   model keeps in float32, e.g. DeepSeek's routers); checkpoint names are mapped to parameter names with
   transformers' own conversion rules for the model (e.g. Mixtral's `block_sparse_moe` -> `mlp`);
3. non-persistent buffers (the rotary embedding's `inv_freq`) are computed by the model's own
   `_init_weights`, as from_pretrained does; tied weights are tied;
4. the fused experts modules keep meta parameters: `realrun.engine.OffloadEngine` swaps them for
   `OffloadedExperts` and the slow tier is filled from the checkpoint (`realrun.ckptstore`).

The result is bit-equal, tensor for tensor, to from_pretrained's model minus its routed experts (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from realrun.checkpoint import Checkpoint
from realrun.quant import TORCH_DTYPES, torch_dtype
from sim.modelspec import ModelSpec
from traces.errors import UserError
from traces.recorder import compute_dtype_name
from traces.routercapture import check_architecture

_DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


@dataclass
class StreamedModel:
    """A model whose routed experts are still in the checkpoint, and what the slow tier needs to fill."""

    model: nn.Module
    """Eval mode on the compute device; its fused experts modules hold meta tensors."""
    spec: ModelSpec
    """The model's spec with `dtype` = the experts' checkpoint dtype (the `bf16` precision's layout)."""
    checkpoint: Checkpoint
    compute_dtype: torch.dtype


def config_of(checkpoint: Checkpoint) -> Any:
    """The transformers config of a checkpoint; UserError for an architecture realrun does not run."""
    from transformers import AutoConfig

    model_type = checkpoint.config.get("model_type")
    if model_type == "deepseek":
        raise UserError(f"{checkpoint.folder} is a DeepSeek V1 model (model_type 'deepseek'): transformers has no "
                        "native implementation of it (it needs remote code), so realrun cannot run it")
    # check_architecture reads model_type only: refuse before transformers sees the folder
    check_architecture(SimpleNamespace(model_type=model_type))
    return AutoConfig.from_pretrained(checkpoint.folder)


def experts_dtype(checkpoint: Checkpoint, spec: ModelSpec) -> torch.dtype:
    """The dtype the routed experts are stored in (that of the first MoE layer's first expert)."""
    parts = checkpoint.expert_tensors(spec.moe_layer_indices[0], 0, spec.num_experts, spec.hidden_size,
                                      spec.expert_intermediate_size)
    return parts.gate.dtype


def checkpoint_spec(checkpoint: Checkpoint, name: str) -> ModelSpec:
    """The spec of a checkpoint, its dtype the one its experts are stored in (not necessarily config.json's)."""
    spec = ModelSpec.from_hf_config(checkpoint.config, name=name)
    dtype = experts_dtype(checkpoint, spec)
    if dtype not in _DTYPE_NAMES:
        raise UserError(f"the routed experts of {checkpoint.folder} are {dtype}; realrun needs bfloat16, float16 or "
                        "float32 experts")
    cfg = dict(checkpoint.config, dtype=_DTYPE_NAMES[dtype], torch_dtype=_DTYPE_NAMES[dtype])
    return ModelSpec.from_hf_config(cfg, name=name)


def resolve_dtype(choice: str, device: torch.device, stored: torch.dtype) -> torch.dtype:
    """The compute dtype for `--dtype choice` (`traces.recorder.compute_dtype_name`: the recorder's rule, so a
    recording and a realrun of one model compute alike). Measured on the AMD EPYC dev VM, which has
    AVX512-BF16: one 2048x1408 expert at 64 tokens takes 7.9 ms in bf16 and 19.2 ms in fp32, at 1 token
    2.3 vs 2.7 ms; on CPUs without native bf16 it is the other way round, several times slower."""
    if choice == "stored":  # internal (calibration): the checkpoint's own dtype on any device
        return stored
    return getattr(torch, compute_dtype_name(choice, device.type, _DTYPE_NAMES[stored]))


def skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """The model with every parameter and buffer on the meta device (no memory, no init)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation="eager")


def _expert_param_names(model: nn.Module) -> set[str]:
    """Names of the fused routed-expert parameters of every MoE block (never materialised)."""
    from realrun.engine import moe_blocks

    modules = {id(block.experts) for _, block in moe_blocks(model)}
    out = set()
    for module_name, module in model.named_modules():
        if id(module) in modules:
            out.update(f"{module_name}.{p}" for p, _ in module.named_parameters())
    return out


def _checkpoint_names(model: nn.Module, checkpoint: Checkpoint, wanted: set[str]) -> dict[str, str]:
    """Model state key -> checkpoint tensor name, by transformers' own renaming rules for this model."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta_state = {k: None for k in wanted}
    found: dict[str, str] = {}
    for key in checkpoint.tensors:
        renamed, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if renamed not in wanted and key in wanted:
            renamed = key
        if renamed in wanted:
            found.setdefault(renamed, key)
    return found


def _target_dtype(model: nn.Module, key: str, meta: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """from_pretrained's rule: float32 for the model's keep-in-fp32 modules, else the skeleton's dtype."""
    import re

    for pattern, plan_dtype in model._get_dtype_plan(dtype).items():
        if re.search(pattern.replace("*", ".*"), key):
            return plan_dtype
    return meta.dtype


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


@torch.no_grad()
def load_streaming(folder: str | Path, device: torch.device, dtype: str = "auto", *,
                   name: str | None = None) -> StreamedModel:
    """The model of checkpoint `folder` on `device`, all but its routed experts loaded (module docstring).

    dtype: a `traces.recorder.DTYPE_CHOICES` value (`resolve_dtype`). The caller owns `checkpoint` (close it
    when done).
    """
    checkpoint = Checkpoint(folder)
    try:
        config = config_of(checkpoint)
        spec = checkpoint_spec(checkpoint, name or str(folder))
        compute = resolve_dtype(dtype, device, torch_dtype(spec.dtype))
        model = skeleton(config, compute)
        experts = _expert_param_names(model)
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
        state = model.state_dict(keep_vars=True)
        wanted = {k for k in state if k not in experts and k not in tied}
        names = _checkpoint_names(model, checkpoint, wanted)
        for key in sorted(wanted):
            meta = state[key]
            source = names.get(key)
            if source is None:
                raise UserError(f"checkpoint {checkpoint.folder} has no tensor for {key}; is it complete and a "
                                f"{config.model_type} checkpoint?")
            entry = checkpoint.entry(source)
            if entry.shape != tuple(meta.shape):
                raise UserError(f"tensor {source} in {entry.path} has shape {list(entry.shape)}, but config.json "
                                f"implies {list(meta.shape)}; the checkpoint and its config disagree")
            value = checkpoint.read(source)
            target = _target_dtype(model, key, meta, compute) if value.is_floating_point() else value.dtype
            _set_tensor(model, key, value.to(device=device, dtype=target))
        _materialise_buffers(model, device)
        if tied:
            model.tie_weights()
        left = [k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta and k not in experts]
        if left:
            raise RuntimeError(f"tensors left on the meta device after loading: {left[:5]}")
        # every MoE layer's experts must be where the slow tier will look (fails now, not mid-run)
        for layer in spec.moe_layer_indices:
            for expert in range(spec.num_experts):
                checkpoint.expert_tensors(layer, expert, spec.num_experts, spec.hidden_size,
                                          spec.expert_intermediate_size)
        return StreamedModel(model.eval(), spec, checkpoint, compute)
    except BaseException:
        checkpoint.close()
        raise


def _materialise_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (not in any checkpoint: rotary `inv_freq`) computed as from_pretrained does,
    by the model's `_init_weights` on their module."""
    owners = {}
    for key, buffer in model.named_non_persistent_buffers():
        module_name, _, leaf = key.rpartition(".")
        module = model.get_submodule(module_name)
        module._buffers[leaf] = torch.empty_like(buffer, device=device)
        owners[module_name] = module
    for module_name, module in owners.items():
        if "RotaryEmbedding" not in type(module).__name__:
            raise RuntimeError(f"{module_name} ({type(module).__name__}) has non-persistent buffers realrun does "
                               "not know how to compute")
        model._init_weights(module)
