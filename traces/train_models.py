"""Train fatesim's two embedded default models: tiny MoE language models with real routing structure.

The models copy the *routing structure* of two published MoE models (layers, routed experts, top-k,
shared experts) at a tiny hidden size, so that traces recorded from them can be replayed with the large
models' shapes (`--as-model`):

- `mini-qwen-moe` (Qwen2MoeForCausalLM): 24 layers, all MoE, 60 routed experts, top-4, one shared
  expert with a sigmoid gate — the structure of Qwen1.5-MoE-A2.7B.
- `mini-deepseek-moe` (DeepseekV2ForCausalLM, greedy softmax top-k): 28 layers, layer 0 dense, 27 MoE
  layers of 64 routed experts, top-6, 2 shared experts — the structure of DeepSeekMoE-16B.

Training text: the English prose (and code examples) of the Python 3.11 documentation, reStructuredText
sources as shipped in Debian's `python3.11-doc` package (`/usr/share/doc/python3.11/html/_sources`).
Licence: the Python documentation is licensed under the PSF License Agreement (version 2); code examples in
it are dual licensed under the PSF License Agreement and the Zero-Clause BSD licence (see `license.rst` in
the package, and `/usr/share/doc/python3.11-doc/copyright`). The script fetches the package itself with
`apt-get download` + `dpkg-deb -x` into a cache folder, so `make models` retrains on a fresh Debian machine.

Every 20th source file (in sorted order, 5% of the files) is held out for the held-out perplexity and the
routing statistics; the byte-level BPE tokenizer is trained on the training files only. Training uses a
Switch-style load-balancing auxiliary loss on every router (captured through forward hooks on the router
modules, `traces.routercapture`), so the routing spreads over the experts instead of collapsing.

CLI: `python -m traces.train_models [--model mini-qwen-moe|mini-deepseek-moe|all] [--minutes M] [--out DIR]`.
Writes a normal Hugging Face model folder per model plus `training.json` beside the weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from traces.atomic import atomic_output
from traces.errors import UserError
from traces.routercapture import RouterCapture

MODELS_DIR = Path(__file__).resolve().parent / "models"
CACHE_DIR = Path(__file__).resolve().parent.parent / ".fatesim-cache" / "train-data"

DATA_PACKAGE = "python3.11-doc"
DATA_SOURCES_DIR = "usr/share/doc/python3.11/html/_sources"
# Prose-rich parts of the documentation; the C API reference, changelogs ("whatsnew") and legacy
# distutils docs are left out (mostly signatures and bullet lists).
DATA_PARTS = ("tutorial", "howto", "faq", "reference", "library", "using", "extending", "glossary.rst.txt")
DATA_LICENCE = (
    "PSF License Agreement v2 (Python documentation); code examples dual licensed PSF-2.0 / 0BSD "
    "(see license.rst and /usr/share/doc/python3.11-doc/copyright in the package)"
)
HELD_OUT_EVERY = 20          # every 20th file (sorted) is held out: 5% of the files
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 4096
SEED = 20260523

SEQ_LEN = 128                # training window, tokens
BATCH = 16                   # windows per step
EVAL_LEN = 256               # evaluation window, tokens
AUX_LOSS_COEF = 0.01         # Switch Transformer's load-balancing coefficient
PEAK_LR = 3e-3
WARMUP_STEPS = 30


@dataclass(frozen=True)
class ModelRecipe:
    """What to build: the HF config class and its keyword arguments."""

    name: str
    config_class: str            # "Qwen2MoeConfig" or "DeepseekV2Config"
    model_class: str             # "Qwen2MoeForCausalLM" or "DeepseekV2ForCausalLM"
    config: dict[str, Any]
    structure_of: str            # the published model whose routing structure this copies


def recipes() -> dict[str, ModelRecipe]:
    """The two embedded models (tiny hidden size, published routing structure)."""
    common = dict(vocab_size=VOCAB_SIZE, hidden_size=64, num_attention_heads=4, max_position_embeddings=1024,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", initializer_range=0.02)
    return {
        "mini-qwen-moe": ModelRecipe(
            "mini-qwen-moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
            dict(common, num_hidden_layers=24, num_key_value_heads=4, intermediate_size=128,
                 moe_intermediate_size=32, shared_expert_intermediate_size=128, num_experts=60,
                 num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                 qkv_bias=True),
            "Qwen1.5-MoE-A2.7B (24 MoE layers, 60 experts, top-4, 1 shared expert)"),
        "mini-deepseek-moe": ModelRecipe(
            "mini-deepseek-moe", "DeepseekV2Config", "DeepseekV2ForCausalLM",
            dict(common, num_hidden_layers=28, num_key_value_heads=4, intermediate_size=192,
                 moe_intermediate_size=24, first_k_dense_replace=1, n_routed_experts=64, num_experts_per_tok=6,
                 n_shared_experts=2, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
                 routed_scaling_factor=1.0, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=16, head_dim=8),
            "DeepSeekMoE-16B (28 layers, layer 0 dense, 64 experts, top-6, 2 shared experts)"),
    }


# ---------------------------------------------------------------------------------------------------- data

def fetch_package(cache: Path) -> Path:
    """Download and unpack the data package into `cache` (once); return the unpacked root."""
    root = cache / DATA_PACKAGE
    if (root / DATA_SOURCES_DIR).is_dir():
        return root
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise UserError(f"training needs apt-get and dpkg-deb to fetch {DATA_PACKAGE}; run it on Debian/Ubuntu")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        got = subprocess.run(["apt-get", "download", DATA_PACKAGE], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob(f"{DATA_PACKAGE}_*.deb"))
        if got.returncode != 0 or not debs:
            raise UserError(f"apt-get download {DATA_PACKAGE} failed ({got.stderr.strip()[-200:]}); "
                            "run `apt-get update` first")
        unpacked = Path(tmp) / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True)
        shutil.copy2(debs[0], unpacked / debs[0].name)
        os.replace(unpacked, root)
    return root


def package_provenance(root: Path) -> dict[str, str]:
    """Name, version and sha256 of the .deb the text came from."""
    deb = sorted(root.glob(f"{DATA_PACKAGE}_*.deb"))[0]
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    return {"package": DATA_PACKAGE, "version": version, "deb": deb.name,
            "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(), "fetched_with": "apt-get download"}


_ROLE = re.compile(r":[a-zA-Z:+-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")
_LITERAL = re.compile(r"``([^`]+)``")
_UNDERLINE = re.compile(r"^\s*([=\-~^\"'*#+`.:_])\1{2,}\s*$")
_DIRECTIVE = re.compile(r"^\s*\.\. ")
_OPTION = re.compile(r"^\s+:[a-zA-Z -]+:( .*)?$")


def clean_rst(text: str) -> str:
    """reStructuredText -> plain text: drop directives, their options, section underlines; unwrap roles."""
    out: list[str] = []
    for line in text.splitlines():
        if _UNDERLINE.match(line) or _DIRECTIVE.match(line) or _OPTION.match(line):
            continue
        line = _ROLE.sub(r"\1", line)
        line = _LINK.sub(r"\1", line)
        line = _LITERAL.sub(r"\1", line)
        out.append(line.rstrip())
    cleaned = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", cleaned).strip() + "\n"


def load_corpus(root: Path) -> tuple[list[str], list[str], dict[str, Any]]:
    """Cleaned documents (train, held out) and a summary of the split."""
    base = root / DATA_SOURCES_DIR
    files: list[Path] = []
    for part in DATA_PARTS:
        path = base / part
        files.extend(sorted(path.rglob("*.rst.txt")) if path.is_dir() else [path])
    files.sort()
    train, held = [], []
    for i, path in enumerate(files):
        doc = clean_rst(path.read_text(encoding="utf-8"))
        (held if i % HELD_OUT_EVERY == HELD_OUT_EVERY // 2 else train).append(doc)
    summary = {"parts": list(DATA_PARTS), "files": len(files), "train_files": len(train),
               "held_out_files": len(held), "train_chars": sum(map(len, train)),
               "held_out_chars": sum(map(len, held)),
               "held_out_rule": f"file index % {HELD_OUT_EVERY} == {HELD_OUT_EVERY // 2} in sorted order"}
    return train, held, summary


def train_tokenizer(docs: list[str]):
    """A byte-level BPE tokenizer (vocab VOCAB_SIZE) as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   pad_token=EOS_TOKEN, unk_token=None, model_max_length=1024)


def encode_stream(tokenizer, docs: list[str]) -> np.ndarray:
    """All documents as one token stream, each followed by EOS; [T] int32."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


# ------------------------------------------------------------------------------------------------ training

def build_model(recipe: ModelRecipe, tokenizer) -> torch.nn.Module:
    import transformers

    config = getattr(transformers, recipe.config_class)(
        **recipe.config, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id)
    return getattr(transformers, recipe.model_class)(config)


def balance_loss(calls, num_experts: int, sigmoid: bool) -> torch.Tensor:
    """Switch-style load-balancing loss, mean over MoE layers: E * sum_e f_e * P_e (1 when balanced).

    f_e: share of the token->expert assignments that went to e; P_e: mean router probability of e.
    """
    losses = []
    for call in calls:
        logits = call.logits.float()
        if sigmoid:
            probs = logits.sigmoid()
            probs = probs / probs.sum(-1, keepdim=True)
        else:
            probs = logits.softmax(-1)
        counts = torch.zeros(num_experts, device=logits.device).index_add_(
            0, call.ids.reshape(-1), torch.ones(call.ids.numel(), device=logits.device))
        f = counts / call.ids.numel()
        losses.append(num_experts * (f * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def lr_at(step: int, progress: float) -> float:
    """Linear warm-up over WARMUP_STEPS, then cosine decay to 10% of the peak as `progress` goes 0 -> 1."""
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    return PEAK_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(model, stream: np.ndarray, minutes: float, steps: int | None, log) -> dict[str, Any]:
    """Train in place for exactly `steps` steps, or else for `minutes` of wall time.

    With a time budget the learning-rate schedule follows the elapsed share of the budget, so a machine
    that gets busier mid-run still ends with an annealed model; the step count reached is recorded.
    Batches are drawn from a seeded generator, so `--steps N` retrains the same model (up to float
    reduction order).
    """
    rng = np.random.default_rng(SEED)
    num_experts = model.config.num_experts if hasattr(model.config, "num_experts") else model.config.n_routed_experts
    sigmoid = model.config.model_type == "deepseek_v3"
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1)
    budget_s = minutes * 60
    model.train()
    started = time.monotonic()
    history = []
    step = 0
    with RouterCapture(model, keep_graph=True) as capture:
        while True:
            elapsed = time.monotonic() - started
            progress = step / steps if steps is not None else elapsed / budget_s
            if progress >= 1.0:
                break
            starts = rng.integers(0, len(stream) - SEQ_LEN - 1, size=BATCH)
            batch = torch.from_numpy(np.stack([stream[s:s + SEQ_LEN + 1] for s in starts]).astype(np.int64))
            for group in opt.param_groups:
                group["lr"] = lr_at(step, progress)
            capture.clear()
            logits = model(input_ids=batch[:, :-1]).logits
            lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
            aux = balance_loss([c for layer in capture.calls for c in layer], num_experts, sigmoid)
            loss = lm + AUX_LOSS_COEF * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % 25 == 0 or step == 1:
                elapsed = time.monotonic() - started
                history.append({"step": step, "lm_loss": round(lm.item(), 4), "aux_loss": round(aux.item(), 4),
                                "elapsed_s": round(elapsed, 1)})
                log(f"  step {step} lm {lm.item():.3f} aux {aux.item():.3f} {elapsed / 60:.1f} min")
    capture.clear()
    model.eval()
    return {"steps": step, "minutes": round((time.monotonic() - started) / 60, 2),
            "budget": f"{steps} steps" if steps is not None else f"{minutes} min",
            "batch_windows": BATCH, "window_tokens": SEQ_LEN, "tokens_seen": step * BATCH * SEQ_LEN,
            "peak_lr": PEAK_LR, "warmup_steps": WARMUP_STEPS, "aux_loss_coef": AUX_LOSS_COEF,
            "optimizer": "AdamW(0.9, 0.95, wd 0.1), grad clip 1.0, cosine to 10% of peak", "history": history}


# ------------------------------------------------------------------------------------- evaluation + stats

def windows(stream: np.ndarray, length: int, limit: int) -> torch.Tensor:
    """Non-overlapping windows of `length` + 1 tokens, at most `limit` of them evenly spread; [W, length+1]."""
    count = (len(stream) - 1) // length
    picks = np.linspace(0, count - 1, num=min(limit, count)).astype(int)
    return torch.from_numpy(np.stack([stream[i * length:i * length + length + 1] for i in picks]).astype(np.int64))


@torch.no_grad()
def evaluate(model, data: torch.Tensor, with_routing: bool) -> dict[str, Any]:
    """Perplexity over `data` windows and, if asked, routing statistics (see `routing_stats`)."""
    nll, count = 0.0, 0
    ids_per_layer: list[list[np.ndarray]] = []
    look: list[list[np.ndarray]] = []
    with RouterCapture(model) as capture:
        moe_layers = len(capture.routers)
        ids_per_layer = [[] for _ in range(moe_layers)]
        look = [[] for _ in range(moe_layers)]
        for chunk in data.split(8):
            capture.clear()
            logits = model(input_ids=chunk[:, :-1]).logits
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), chunk[:, 1:].reshape(-1),
                                   reduction="sum").item()
            count += chunk[:, 1:].numel()
            if with_routing:
                w, t = chunk.shape[0], chunk.shape[1] - 1
                for layer, calls in enumerate(capture.calls):
                    call = calls[0]
                    ids_per_layer[layer].append(call.ids.reshape(w, t, -1).numpy())
                    if layer + 1 < moe_layers:
                        nxt = capture.router_logits_on(layer + 1, call.gate_input)
                        look[layer].append(nxt.reshape(w, t, -1).float().numpy())
    out: dict[str, Any] = {"perplexity": round(math.exp(nll / count), 3), "tokens": count}
    if with_routing:
        ids = [np.concatenate(x) for x in ids_per_layer]            # L x [W, T, k]
        lookahead = [np.concatenate(x) for x in look[:-1]]          # (L-1) x [W, T, E]
        out["routing"] = routing_stats(ids, lookahead)
    return out


def routing_stats(ids: list[np.ndarray], lookahead: list[np.ndarray]) -> dict[str, Any]:
    """Routing structure on held-out text; every figure is a mean over MoE layers.

    - popularity: share of the routing slots taken by each expert; `max_share_x_uniform` is the most
      popular expert's share over 1/E, `top10pct_share` the share of the most popular 10% of experts,
      `entropy_norm` the entropy of the shares over log E (1 = uniform), `unused_experts` the count of
      experts never chosen (summed over layers).
    - temporal locality: |S_t ∩ S_t-1| / k for consecutive tokens of a window (`random_baseline` k/E).
    - cross-layer predictability: precision at k of top-k(router_{l+1}(gate input of l)) against the
      experts layer l+1 routed to (`random_baseline` k/E).
    """
    num_layers = len(ids)
    k = ids[0].shape[-1]
    num_experts = lookahead[0].shape[-1] if lookahead else int(max(x.max() for x in ids)) + 1
    max_x, top10, entropy, unused, overlap, cross = [], [], [], 0, [], []
    for layer in range(num_layers):
        sel = ids[layer]                                                    # [W, T, k]
        share = np.bincount(sel.reshape(-1), minlength=num_experts) / sel.size
        max_x.append(share.max() * num_experts)
        top10.append(np.sort(share)[::-1][: max(1, num_experts // 10)].sum())
        nz = share[share > 0]
        entropy.append(float(-(nz * np.log(nz)).sum() / np.log(num_experts)))
        unused += int((share == 0).sum())
        hit = (sel[:, 1:, :, None] == sel[:, :-1, None, :]).any(-1).sum(-1)  # [W, T-1]
        overlap.append(hit.mean() / k)
        if layer + 1 < num_layers:
            pred = np.argpartition(-lookahead[layer], k - 1, axis=-1)[..., :k]  # [W, T, k]
            actual = ids[layer + 1]
            cross.append((pred[..., :, None] == actual[..., None, :]).any(-1).sum(-1).mean() / k)
    baseline = k / num_experts
    return {
        "moe_layers": num_layers, "experts": num_experts, "top_k": k,
        "popularity": {"max_share_x_uniform": round(float(np.mean(max_x)), 3),
                       "top10pct_share": round(float(np.mean(top10)), 4),
                       "top10pct_share_if_uniform": round(max(1, num_experts // 10) / num_experts, 4),
                       "entropy_norm": round(float(np.mean(entropy)), 4), "unused_experts": unused},
        "temporal_overlap": {"mean": round(float(np.mean(overlap)), 4), "random_baseline": round(baseline, 4)},
        "cross_layer_precision_d1": {"mean": round(float(np.mean(cross)), 4), "random_baseline": round(baseline, 4),
                                     "per_layer": [round(float(c), 3) for c in cross]},
    }


# ----------------------------------------------------------------------------------------------- writing

def count_parameters(model) -> dict[str, int]:
    """Parameter counts: total, routed experts, and the rest."""
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    return {"total": total, "routed_experts": routed, "non_routed": total - routed}


def save_model(model, tokenizer, target: Path) -> None:
    """Write the model (bf16 safetensors) and tokenizer into `target`, replacing it as a whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model folder is meant to be shared
    try:
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        model.to(torch.float32)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def train_one(recipe: ModelRecipe, tokenizer, train_stream: np.ndarray, held_stream: np.ndarray,
              data_info: dict[str, Any], minutes: float, steps: int | None, out: Path, log) -> dict[str, Any]:
    """Build, train, save and evaluate one model; returns the training.json content."""
    torch.manual_seed(SEED)
    model = build_model(recipe, tokenizer)
    params = count_parameters(model)
    log(f"{recipe.name}: {params['total'] / 1e6:.2f} M parameters ({params['routed_experts'] / 1e6:.2f} M routed)")
    run = train(model, train_stream, minutes, steps, log)
    target = out / recipe.name
    save_model(model, tokenizer, target)
    # Evaluate what was saved: bf16 weights, float32 compute (as the recorder runs it on CPU).
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    held = evaluate(saved, windows(held_stream, EVAL_LEN, 256), with_routing=True)
    train_eval = evaluate(saved, windows(train_stream, EVAL_LEN, 256), with_routing=False)
    weights = target / "model.safetensors"
    info = {
        "model": recipe.name, "architecture": recipe.model_class, "structure_of": recipe.structure_of,
        "config": recipe.config, "parameters": params, "weights_bytes": weights.stat().st_size,
        "weights_dtype": "bfloat16", "data": data_info, "tokenizer": {"kind": "byte-level BPE",
                                                                      "vocab_size": len(tokenizer)},
        "seed": SEED, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "command": "python -m traces.train_models " + " ".join(sys.argv[1:]),
        "training": run,
        "train_perplexity": train_eval["perplexity"], "train_eval_tokens": train_eval["tokens"],
        "held_out_perplexity": held["perplexity"], "held_out_eval_tokens": held["tokens"],
        "routing_held_out": held["routing"],
    }
    with atomic_output(target / "training.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.chmod(0o644)
    for path in target.iterdir():
        path.chmod(0o644)
    log(f"{recipe.name}: train ppl {info['train_perplexity']}, held-out ppl {info['held_out_perplexity']}, "
        f"{weights.stat().st_size / 2**20:.1f} MiB")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m traces.train_models", description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=[*recipes(), "all"], default="all", help="which model (default: all)")
    parser.add_argument("--minutes", type=float, default=18.0,
                        help="wall-clock training time per model in minutes (default: 18)")
    parser.add_argument("--steps", type=int, default=None,
                        help="exact step count (overrides --minutes; for bit-reproducible retraining)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (default: 2; use 1 on a machine shared with other jobs: OpenMP "
                             "threads that wait for each other on oversubscribed cores slow training down)")
    parser.add_argument("--out", type=Path, default=MODELS_DIR, help=f"output folder (default: {MODELS_DIR})")
    parser.add_argument("--cache", type=Path, default=CACHE_DIR, help=f"data cache (default: {CACHE_DIR})")
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    try:
        root = fetch_package(args.cache)
        train_docs, held_docs, split = load_corpus(root)
        log(f"data: {split['train_files']} train files ({split['train_chars'] / 1e6:.1f} M chars), "
            f"{split['held_out_files']} held out ({split['held_out_chars'] / 1e6:.2f} M chars)")
        tokenizer = train_tokenizer(train_docs)
        train_stream = encode_stream(tokenizer, train_docs)
        held_stream = encode_stream(tokenizer, held_docs)
        data_info = {"source": "Python 3.11 documentation (reStructuredText sources)", "licence": DATA_LICENCE,
                     **package_provenance(root), **split, "train_tokens": int(len(train_stream)),
                     "held_out_tokens": int(len(held_stream))}
        log(f"tokens: {len(train_stream)} train, {len(held_stream)} held out")
        names = list(recipes()) if args.model == "all" else [args.model]
        for name in names:
            train_one(recipes()[name], tokenizer, train_stream, held_stream, data_info, args.minutes, args.steps,
                      args.out, log)
    except UserError as err:
        print(f"train_models: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
