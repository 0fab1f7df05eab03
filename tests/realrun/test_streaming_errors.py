"""Bad checkpoints and arguments: one-line UserErrors naming the file or tensor (exit 2 from the CLI),
before any store is written; and the memory bound of a streamed run from the disk tier."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from realrun.checkpoint import Checkpoint
from realrun.streaming import load_streaming
from sim.cli import main
from tests.realrun.conftest import PROMPTS
from tests.realrun.test_streaming import write_checkpoint
from traces.errors import UserError

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return write_checkpoint("qwen2_moe", tmp_path_factory.mktemp("good") / "m", shard="60KB")


@pytest.fixture
def broken(sharded: Path, tmp_path: Path) -> Path:
    """A copy of the sharded checkpoint this test may damage."""
    return Path(shutil.copytree(sharded, tmp_path / "broken"))


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"token_ids": p}) + "\n" for p in PROMPTS.token_ids))
    return path


def _shard_with(folder: Path, fragment: str) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return folder / next(f for k, f in index.items() if fragment in k)


def test_missing_shard(broken: Path) -> None:
    shard = _shard_with(broken, "experts.3.gate_proj")
    shard.unlink()
    with pytest.raises(UserError, match=f"names {shard.name}, which is not in"):
        Checkpoint(broken)


def test_truncated_shard(broken: Path) -> None:
    shard = _shard_with(broken, "experts.3.gate_proj")
    os.truncate(shard, shard.stat().st_size - 10)
    with pytest.raises(UserError, match=f"{shard.name} is truncated: tensor"):
        Checkpoint(broken)


@pytest.mark.parametrize("content, reason", [
    (b"\x89PNG", "only 4 bytes"),
    ((1 << 40).to_bytes(8, "little") + b"{}", "header length 1099511627776 does not fit"),
    ((4).to_bytes(8, "little") + b"nope", "header is not JSON"),
])
def test_a_shard_that_is_not_a_safetensors_file(broken: Path, content: bytes, reason: str) -> None:
    shard = _shard_with(broken, "experts.3.gate_proj")
    shard.write_bytes(content)
    with pytest.raises(UserError, match=f"{shard.name} is not a readable safetensors file \\({reason}.*re-download it"):
        Checkpoint(broken)


def test_index_names_a_file_that_does_not_hold_the_tensor(broken: Path) -> None:
    path = broken / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00099.safetensors"
    path.write_text(json.dumps(index))
    with pytest.raises(UserError, match="model-00001-of-00099.safetensors, which is not in"):
        Checkpoint(broken)


def test_expert_shape_disagrees_with_config(broken: Path) -> None:
    cfg = json.loads((broken / "config.json").read_text())
    cfg["moe_intermediate_size"] = 48
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"tensor model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight in .*\.safetensors "
                                        r"has shape \[32, 64\], but config\.json implies \[48, 64\]"):
        load_streaming(broken, CPU, "float32")


def test_non_expert_shape_disagrees_with_the_file(broken: Path) -> None:
    shard = _shard_with(broken, "model.norm.weight")
    tensors = load_file(shard)
    tensors["model.norm.weight"] = torch.ones(32, dtype=torch.bfloat16)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"tensor model\.norm\.weight in .* has shape \[32\]"):
        load_streaming(broken, CPU, "float32")


def test_unsupported_architecture(broken: Path) -> None:
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "llama"
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="unsupported model architecture 'llama'"):
        load_streaming(broken, CPU, "float32")


def test_deepseek_v1_is_refused_honestly(broken: Path) -> None:
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "deepseek"
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="no native implementation"):
        load_streaming(broken, CPU, "float32")


@pytest.mark.parametrize("damage, args, message", [
    ("missing-shard", ["--memory-budget", "50%"], "which is not in"),
    ("truncated", ["--memory-budget", "50%"], "is truncated"),
    # the budget is checked before any weight is read: the missing shard is never noticed
    ("missing-shard", ["--memory-budget", "3%"], "raise --memory-budget"),
])
def test_cli_exit_2_one_line_and_no_store(broken: Path, prompts_file: Path, tmp_path: Path, monkeypatch, capsys,
                                          damage: str, args: list[str], message: str) -> None:
    stores = tmp_path / "stores"
    monkeypatch.setattr("realrun.session.STORE_DIR", stores)
    shard = _shard_with(broken, "experts.3.gate_proj")
    if damage == "missing-shard":
        shard.unlink()
    else:
        os.truncate(shard, shard.stat().st_size - 10)
    with pytest.raises(SystemExit) as done:
        main(["realrun", "--model", str(broken), "--prompts", str(prompts_file), "--policy", "lru",
              "--set", "precision=int4", "--max-new-tokens", "2", *args])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fatesim: error:") and message in err and "\n" not in err
    assert not stores.exists() or not any(stores.iterdir())


# --- memory bound -------------------------------------------------------------------------------------
LAYERS, EXPERTS, HIDDEN, INTER = 4, 32, 1024, 1024
EXPERT_BYTES = LAYERS * EXPERTS * 3 * HIDDEN * INTER * 2  # bf16: 768 MiB


def _big_checkpoint(folder: Path) -> Path:
    """A Qwen2-MoE checkpoint with 768 MiB of bf16 experts, written shard by shard (one shard per layer's
    experts) without ever building the model."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    cfg = Qwen2MoeConfig(vocab_size=256, hidden_size=HIDDEN, intermediate_size=256, moe_intermediate_size=INTER,
                         shared_expert_intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=16,
                         num_key_value_heads=1, num_experts=EXPERTS, num_experts_per_tok=2,
                         max_position_embeddings=64, tie_word_embeddings=False, dtype="bfloat16")
    folder.mkdir()
    cfg.save_pretrained(folder)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    weight_map, dense = {}, {}
    for name, t in skeleton.state_dict().items():
        if ".experts." not in name:
            dense[name] = (torch.randn(t.shape, generator=g) * 0.05).to(torch.bfloat16)
    shards = [dense] + [None] * LAYERS
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for i, shard in enumerate(shards):
        if shard is None:  # one layer's experts, generated just before they are written
            layer = i - 1
            shard = {}
            for e in range(EXPERTS):
                for proj, shape in (("gate_proj", (INTER, HIDDEN)), ("up_proj", (INTER, HIDDEN)),
                                    ("down_proj", (HIDDEN, INTER))):
                    shard[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = \
                        (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)
        save_file(shard, folder / files[i], metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, files[i]))
        del shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


CHILD = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    import realrun.session, realrun.ckptstore, transformers, transformers.models.qwen2_moe.modeling_qwen2_moe
    from realrun.session import run_realrun

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    base = status("VmRSS:")
    result = run_realrun(sys.argv[1], sys.argv[2], "lru", "9%", store="disk", max_new_tokens=2,
                         profile="rtx3090-bound", dtype="bfloat16")
    print(json.dumps({"base": base, "peak": status("VmHWM:"), "budget": result["expert_budget_bytes"],
                      "transferred": result["bytes_transferred"]["total"]}))
""")


def test_streamed_disk_run_stays_far_below_the_experts_size(tmp_path: Path, prompts_file: Path) -> None:
    """A run from the disk tier never holds the experts: the child's peak RSS grows by less than a quarter
    of the checkpoint's expert bytes (the in-memory path would hold all of them)."""
    folder = _big_checkpoint(tmp_path / "big")
    env = dict(os.environ, PYTHONPATH=str(ROOT), FATESIM_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(prompts_file)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    growth = got["peak"] - got["base"]
    assert got["transferred"] > 0
    assert growth < EXPERT_BYTES / 4, (growth, got)
