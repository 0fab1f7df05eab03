"""Random-weight Hugging Face checkpoints at full size, written shard by shard.

`write_checkpoint(folder, config)` writes what the hub serves for a model: `config.json`,
`model-XXXXX-of-YYYYY.safetensors` shards of at most `max_shard_bytes` each and
`model.safetensors.index.json` (`{"metadata": {"total_size": N}, "weight_map": {name: file}}`), in bfloat16,
in the hub's tensor names (per-expert `model.layers.{i}.mlp.experts.{e}.gate_proj.weight`, ...), without
ever building the model: a 14.3B-parameter Qwen1.5-MoE-A2.7B (28.6 GB) fits neither this machine's RAM nor
its patience through `save_pretrained`.

Where the names and shapes come from: the transformers model class itself, built on the meta device (no
memory), whose state dict is turned back into the hub's names by transformers' own
`revert_weight_conversion` (the inverse of the loading conversions in `transformers/conversion_mapping.py`,
the same call `save_pretrained` makes): the fused `mlp.experts.gate_up_proj [E, 2I, H]` becomes E
`gate_proj.weight [I, H]` and E `up_proj.weight [I, H]`, `down_proj [E, H, I]` becomes E
`down_proj.weight [H, I]`. Tied weights are left out as `save_pretrained` leaves them out.

Values: normalisation weights are 1; every other tensor is random bfloat16 with a random sign, a random
7-bit mantissa and an exponent of 2^-7 or 2^-6, i.e. magnitudes in [2^-7, 2^-5) and a standard deviation
of 0.0189, like the usual `normal(0, 0.02)` initialisation, so activations stay finite in bf16. The bits are
drawn as uint16 straight from a numpy PCG64 generator seeded by (seed, CRC-32 of the tensor's name): 0.6 GB/s
of bf16 on one core of a 2-core AMD EPYC VM, bit operations included, where `torch.normal` + cast manages
0.25-0.3 GB/s; each tensor's values depend only on the seed and its name, not on the sharding
(`tensor_values` regenerates any one of them). At full size the fsynced writes dominate (README: measured).

Memory: one shard's tensors at a time (safetensors 0.8 writes them without another copy). Each shard goes
to a temporary name in `<folder>.partial`, is fsynced and renamed; the folder is renamed onto `<folder>`
last, so it appears complete or not at all.

`python -m realrun.checkpoint_gen --preset qwen1.5-moe-a2.7b --out DIR` writes a preset (see `PRESETS`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from traces.errors import UserError

SUPPORTED_MODEL_TYPES = ("qwen2_moe", "deepseek_v2")
"""`model_type`s whose generated checkpoints are tested to load in transformers with no missing keys."""

DEFAULT_MAX_SHARD_BYTES = 4_000_000_000
"""The hub's usual shard size for these models (Qwen1.5-MoE-A2.7B ships 8 shards of about 4 GB)."""

INDEX_NAME = "model.safetensors.index.json"
GENERATOR_KEY = "fatesim_generator"
"""config.json key holding the generator's provenance (preset, seed, substitution); reuse checks it."""

PRESETS: dict[str, dict[str, Any]] = {
    # The published config.json of Qwen/Qwen1.5-MoE-A2.7B (routing fields as in
    # traces.model_configs.BUILTIN_CONFIGS; the rest as transformers' Qwen2MoeConfig documents for this
    # model). max_position_embeddings / sliding_window only bound the context; they change no weight. The
    # q/k/v biases the model has come from transformers' `qkv_bias` default (True); the file has no such key.
    "qwen1.5-moe-a2.7b": {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 8192,
        "max_window_layers": 21, "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
        "decoder_sparse_step": 1, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
        "num_experts_per_tok": 4, "num_experts": 60, "norm_topk_prob": False, "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
    },
    # DeepSeekMoE-16B (deepseek-ai/deepseek-moe-16b-base) is `model_type: deepseek`, remote code only:
    # transformers 5.24 has no native class for it. The closest native architecture with the same experts
    # is DeepSeek-V2 (`deepseek_v2`): its MoE block is DeepSeekMoE's (softmax router, greedy top-6 without
    # renormalisation, 64 routed experts of intermediate 1408, 2 shared experts fused into one MLP of
    # 2 x 1408, first layer dense of 10944) with the same hub tensor names. Everything but attention is
    # DeepSeekMoE-16B's (28 layers, hidden 2048, vocab 102400, rope theta 10000, 4096 positions); the
    # attention is DeepSeek-V2's MLA, sized as close to DeepSeekMoE's 16 x 128 multi-head attention as MLA
    # allows: 16 heads, q/k head dim 128 (64 without + 64 with rotary), v head dim 128 (so q_proj and o_proj
    # are MHA's 2048 x 2048), KV compressed to rank 512 (DeepSeek-V2-Lite's). Attention has 11.1M
    # parameters per layer instead of MHA's 16.8M (-0.16B of 16.4B in all); the expert bytes are identical.
    "deepseek-moe-16b-as-deepseek-v2": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
        "max_position_embeddings": 4096, "moe_intermediate_size": 1408, "moe_layer_freq": 1,
        "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
        "num_experts_per_tok": 6, "num_hidden_layers": 28, "num_key_value_heads": 16, "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "topk_method": "greedy",
        "n_group": 1, "topk_group": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 102400, "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 64, "v_head_dim": 128,
    },
}
"""Preset name -> config.json dict. `deepseek-moe-16b-as-deepseek-v2` is a substitution (see its comment)."""

SUBSTITUTIONS: dict[str, str] = {
    "deepseek-moe-16b-as-deepseek-v2": (
        "DeepSeekMoE-16B (hub model_type 'deepseek', remote code; no native transformers class) as a native "
        "deepseek_v2 model: DeepSeekMoE-16B's MoE blocks, layers, hidden size and vocabulary; DeepSeek-V2 MLA "
        "attention (16 heads, qk 64+64, v 128, kv rank 512) instead of 16 x 128 multi-head attention"),
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the hub checkpoint."""

    name: str
    """Hub name, e.g. model.layers.0.mlp.experts.3.gate_proj.weight."""
    shape: tuple[int, ...]
    is_norm: bool
    """True for a normalisation weight (written as ones)."""

    @property
    def nbytes(self) -> int:
        """Bytes in bfloat16."""
        return 2 * int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class CheckpointStats:
    """What `write_checkpoint` did (all of it 0 when an existing folder was reused)."""

    folder: Path
    reused: bool
    num_tensors: int
    num_shards: int
    total_bytes: int
    """Sum of the tensors' bytes (the index's total_size)."""
    file_bytes: int
    """Bytes of the shard files on disk (tensors plus safetensors headers)."""
    generate_s: float
    """Seconds spent drawing random values."""
    write_s: float
    """Seconds spent in save_file plus fsync."""
    wall_s: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus throughputs in bytes per second."""
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        d["bytes_per_s"] = self.total_bytes / self.wall_s if self.wall_s > 0 else None
        d["generate_bytes_per_s"] = self.total_bytes / self.generate_s if self.generate_s > 0 else None
        return d


def _config_object(config: dict[str, Any]) -> Any:
    """The transformers config of a config.json dict (UserError for an unsupported or unknown type)."""
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"model_type {model_type!r} is not supported by the checkpoint generator; use one of "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", GENERATOR_KEY)}
    return AutoConfig.for_model(model_type, **fields)


def hub_tensors(config: dict[str, Any]) -> tuple[list[TensorSpec], str]:
    """(every tensor of the hub checkpoint in the hub's names, natural order; the model class name), from
    the transformers model class built on the meta device (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError as error:  # internal API of transformers 5.x; name what broke
        raise RuntimeError(f"this transformers has no {error.name}: the generator needs transformers 5.x's "
                           "revert_weight_conversion to derive the hub names") from None
    cfg = _config_object(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    hub = revert_weight_conversion(model, state)
    norms = {f"{name}.weight" for name, module in model.named_modules() if "Norm" in type(module).__name__}
    # revert_weight_conversion keeps non-expert names; only norms (and nothing they were fused into) are ones
    specs = [TensorSpec(name, tuple(int(s) for s in t.shape), name in norms) for name, t in hub.items()]
    return specs, type(model).__name__


def plan_shards(tensors: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Tensors in order, cut into shards of at most `max_shard_bytes` (a larger tensor gets its own shard),
    as `save_pretrained` shards."""
    if max_shard_bytes <= 0:
        raise UserError(f"max shard size {max_shard_bytes} B must be positive")
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_name(index: int, count: int) -> str:
    """The hub's shard file name, 1-based: model-00001-of-00008.safetensors."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


# bf16 bits: sign (bit 15), exponent (bits 14-7), mantissa (bits 6-0). Keeping the sign, the exponent's
# lowest bit and the mantissa of random bits and fixing the exponent's upper 7 bits to 0b0111100 gives
# exponents 120 or 121: magnitudes in [2^-7, 2^-5).
_RANDOM_KEEP = np.uint16(0x80FF)
_RANDOM_EXPONENT = np.uint16(0x3C00)
_BF16_ONE = np.uint16(0x3F80)


def tensor_values(spec: TensorSpec, seed: int) -> torch.Tensor:
    """The tensor's bfloat16 values: ones for a norm, else the seeded random bits (module docstring)."""
    count = int(np.prod(spec.shape, dtype=np.int64))
    if spec.is_norm:
        bits = np.full(count, _BF16_ONE, dtype=np.uint16)
    else:
        rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
        # full-range uint16 straight into a writable array: no second copy (each fresh page costs a fault)
        bits = rng.integers(0, 1 << 16, size=count, dtype=np.uint16)
        np.bitwise_and(bits, _RANDOM_KEEP, out=bits)
        np.bitwise_or(bits, _RANDOM_EXPONENT, out=bits)
    return torch.from_numpy(bits).view(torch.bfloat16).reshape(spec.shape)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def generator_provenance(config: dict[str, Any], seed: int, max_shard_bytes: int) -> dict[str, Any]:
    """What identifies a generated checkpoint: the config it was made from, the seed and the shard size."""
    fields = {k: v for k, v in config.items() if k != GENERATOR_KEY}
    digest = zlib.crc32(json.dumps(fields, sort_keys=True).encode())
    return {"seed": seed, "max_shard_bytes": max_shard_bytes, "config_crc32": digest,
            "values": "bf16: sign, exponent 2^-7 or 2^-6, mantissa random (std 0.0189); norms 1"}


def is_complete(folder: Path, provenance: dict[str, Any] | None = None) -> bool:
    """True when `folder` is a finished generated checkpoint (and, given `provenance`, made by it)."""
    try:
        config = json.loads((folder / "config.json").read_text())
        index = json.loads((folder / INDEX_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    files = set(index.get("weight_map", {}).values())
    if not files or not all((folder / f).is_file() for f in files):
        return False
    made = config.get(GENERATOR_KEY, {})
    return provenance is None or all(made.get(k) == v for k, v in provenance.items())


def write_checkpoint(folder: str | os.PathLike[str], config: dict[str, Any], *, seed: int = 0,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, name: str | None = None,
                     reuse: bool = True, progress: Callable[[str, int, int], None] | None = None) -> CheckpointStats:
    """Write the random checkpoint of `config` (a config.json dict with `model_type`) into `folder`.

    reuse: keep an existing complete folder written from the same config, seed and shard size.
    progress(shard file, shards done, shard count) after each shard. name: recorded in the provenance
    (a preset name) with its substitution note when it has one.
    """
    folder = Path(folder)
    start = time.perf_counter()
    provenance = generator_provenance(config, seed, max_shard_bytes)
    if reuse and is_complete(folder, provenance):
        return CheckpointStats(folder, True, 0, 0, 0, 0, 0.0, 0.0, 0.0)
    tensors, architecture = hub_tensors(config)
    shards = plan_shards(tensors, max_shard_bytes)
    if not folder.parent.is_dir():
        raise UserError(f"cannot write {folder}: folder {folder.parent} does not exist")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a run killed half way left it; nothing in it is trusted
    partial.mkdir()
    from safetensors.torch import save_file

    generate_s = write_s = 0.0
    weight_map: dict[str, str] = {}
    file_bytes = 0
    try:
        for i, shard in enumerate(shards):
            fname = shard_name(i, len(shards))
            t0 = time.perf_counter()
            tensors_of_shard = {t.name: tensor_values(t, seed) for t in shard}
            t1 = time.perf_counter()
            tmp = partial / f".{fname}.tmp"
            save_file(tensors_of_shard, tmp, metadata={"format": "pt"})
            del tensors_of_shard  # one shard in memory at a time
            _fsync(tmp)  # the throughput we report is the disk's, not the page cache's
            os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600; a model folder is readable like any file
            os.replace(tmp, partial / fname)
            write_s += time.perf_counter() - t1
            generate_s += t1 - t0
            file_bytes += (partial / fname).stat().st_size
            weight_map.update({t.name: fname for t in shard})
            if progress is not None:
                progress(fname, i + 1, len(shards))
        total = sum(t.nbytes for t in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (partial / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        made = dict(provenance)
        if name is not None:
            made["preset"] = name
            if name in SUBSTITUTIONS:
                made["substitution"] = SUBSTITUTIONS[name]
        out_config = {"architectures": [architecture], **config, GENERATOR_KEY: made}
        (partial / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)  # the folder appears complete or not at all
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return CheckpointStats(folder, False, len(tensors), len(shards), total, file_bytes, generate_s, write_s,
                           time.perf_counter() - start)


def preset_config(preset: str, **overrides: Any) -> dict[str, Any]:
    """A preset's config.json dict with `overrides` (e.g. fewer layers for a test)."""
    if preset not in PRESETS:
        raise UserError(f"unknown checkpoint preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return {**PRESETS[preset], **overrides}


def write_preset(folder: str | os.PathLike[str], model: str = "qwen1.5-moe-a2.7b", seed: int = 0) -> Path:
    """Write (or reuse) a preset's full-size checkpoint into `folder`; returns the folder. This is the
    generator `calibration.gpu_check` calls for its full-size step."""
    write_checkpoint(folder, preset_config(model), seed=seed, name=model)
    return Path(folder)


def main(argv: list[str] | None = None) -> None:
    """Command line: write one preset's (or a config file's) random checkpoint."""
    import click

    @click.command()
    @click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None, help="A built-in model shape.")
    @click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  default=None, help="Or a config.json to take the shapes from.")
    @click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
                  help="Folder to create (replaced if it exists with another config).")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--max-shard-gb", type=click.FloatRange(min=0.001), default=DEFAULT_MAX_SHARD_BYTES / 1e9,
                  show_default=True, help="Largest shard in GB (10^9 bytes).")
    def command(preset: str | None, config_path: Path | None, out: Path, seed: int, max_shard_gb: float) -> None:
        """Write a random-weight Hugging Face checkpoint, shard by shard."""
        if (preset is None) == (config_path is None):
            raise UserError("give exactly one of --preset or --config")
        config = preset_config(preset) if preset else json.loads(config_path.read_text())
        stats = write_checkpoint(out, config, seed=seed, max_shard_bytes=int(max_shard_gb * 1e9), name=preset,
                                 progress=lambda f, done, n: click.echo(f"{f} ({done}/{n})", err=True))
        click.echo(json.dumps(stats.as_dict(), indent=2))

    try:
        command.main(args=argv, standalone_mode=False)
    except UserError as error:
        click.echo(f"checkpoint_gen: error: {error}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
