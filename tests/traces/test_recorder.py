"""The recorder on small randomly initialised models of every supported architecture.

Each model is built here (2-4 layers, 8 experts, hidden 16, seeded), saved as a HF folder in float32 with
a tiny byte-level BPE tokenizer, and recorded with gate inputs and look-ahead D=2. What is asserted:

- routing: the recorded ids are the top-k of the recorded logits under the architecture's own scoring,
  recomputed here from the float16 logits (softmax/greedy: top-k of the logits; DeepSeek-V2
  group_limited_greedy: top-k inside the `topk_group` groups with the largest max softmax score;
  DeepSeek-V3: top-k of sigmoid + correction bias inside the groups with the largest sum of their top-2),
  with a 1e-2 tolerance for float16 rounding; and the recorded weights equal the architecture's weight
  formula applied to the recorded logits;
- look-ahead: lookahead[d-1, t, l] == F.linear(gate_input[t, l], W_router(l+d)), zeros where l+d >= L;
- recording leaves generation unchanged: the decode token ids equal a greedy loop without hooks that
  recomputes the whole sequence each step (no KV cache);
- user mistakes raise UserError: unsupported architecture, empty or missing prompt file, hub id.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from traces.errors import UserError
from traces.format import read_trace
from traces.promptset import load_prompts, prompts_identity
from traces.recorder import record_trace
from traces.routercapture import find_routers

transformers = pytest.importorskip("transformers")

PROMPTS = ["The cache keeps experts close.", "def f(x):\n    return x + 1"]
NEW_TOKENS = 4
COMMON = dict(vocab_size=300, hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
              max_position_embeddings=128, tie_word_embeddings=False)
CONFIGS: dict[str, tuple[str, str, dict]] = {
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(COMMON, num_hidden_layers=3, intermediate_size=32, moe_intermediate_size=8,
                       shared_expert_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                       norm_topk_prob=False, mlp_only_layers=[])),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(COMMON, num_hidden_layers=4, intermediate_size=32, moe_intermediate_size=8,
                         first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                         topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
                         q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
                         head_dim=4)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(COMMON, num_hidden_layers=4, intermediate_size=32, moe_intermediate_size=8,
                         first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                         n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                         q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
                         head_dim=4)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(COMMON, num_hidden_layers=3, intermediate_size=8, num_local_experts=8, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(COMMON, num_hidden_layers=3, intermediate_size=8, num_experts=8, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(COMMON, num_hidden_layers=3, intermediate_size=32, moe_intermediate_size=8, num_experts=8,
                       num_experts_per_tok=2, norm_topk_prob=True, head_dim=8)),
}
TOL = 1e-2  # float16 rounding of the stored logits


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(PROMPTS * 4, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _build(arch: str, folder: Path) -> torch.nn.Module:
    config_name, model_name, kwargs = CONFIGS[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**kwargs, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for _, router in find_routers(model):
            router.weight.normal_(0.0, 0.5)  # spread the logits: random init leaves them nearly tied
            if hasattr(router, "e_score_correction_bias"):
                router.e_score_correction_bias.copy_(torch.randn(router.num_experts) * 0.1)
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("".join(json.dumps({"id": i, "kind": "test", "text": t}) + "\n" for i, t in enumerate(PROMPTS)))
    return path


@pytest.fixture(scope="module", params=list(CONFIGS))
def recorded(request, tmp_path_factory, prompt_file):
    """(architecture, model, trace) for one architecture."""
    arch = request.param
    folder = tmp_path_factory.mktemp(arch)
    model = _build(arch, folder / "model")
    trace = record_trace(str(folder / "model"), prompt_file, folder / "t.safetensors", max_new_tokens=NEW_TOKENS,
                         lookahead=2, gate_inputs=True, progress=False)
    return arch, model, trace, folder / "t.safetensors"


def _groups_ok(scores: np.ndarray, ids: np.ndarray, n_group: int, topk_group: int, group_score) -> None:
    """Every chosen expert lies in one of the `topk_group` best groups (ties within TOL allowed)."""
    per = scores.shape[-1] // n_group
    g = group_score(scores.reshape(-1, n_group, per))                      # [N, G]
    cut = np.sort(g, axis=-1)[:, -topk_group][:, None]                      # [N, 1]
    chosen_group = ids // per
    assert np.all(np.take_along_axis(g, chosen_group, axis=-1) >= cut - TOL)


def _topk_ok(scores: np.ndarray, ids: np.ndarray, allowed: np.ndarray | None = None) -> None:
    """The chosen experts' scores are >= every other allowed expert's score (up to TOL)."""
    masked = scores.copy() if allowed is None else np.where(allowed, scores, -np.inf)
    chosen = np.take_along_axis(scores, ids, axis=-1).min(-1)
    others = masked.copy()
    np.put_along_axis(others, ids, -np.inf, axis=-1)
    assert np.all(chosen >= others.max(-1) - TOL)


def _expected_weights(arch: str, cfg, logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(logits.astype(np.float32))
    idx = torch.from_numpy(ids.astype(np.int64))
    if arch == "deepseek_v3":
        w = x.sigmoid().gather(-1, idx)
        w = w / (w.sum(-1, keepdim=True) + 1e-20) if cfg.norm_topk_prob else w
        return (w * cfg.routed_scaling_factor).numpy()
    w = x.softmax(-1).gather(-1, idx)
    if arch == "deepseek_v2":
        return (w * cfg.routed_scaling_factor).numpy()
    if arch == "mixtral" or getattr(cfg, "norm_topk_prob", False):
        w = w / w.sum(-1, keepdim=True)
    return w.numpy()


def test_ids_are_the_architectures_topk_of_the_logits(recorded):
    """Recorded ids = top-k under the architecture's scoring; recorded weights = its weight formula."""
    arch, model, trace, _ = recorded
    cfg = model.config
    routers = find_routers(model)
    for layer in range(trace.num_moe_layers):
        logits = trace.router_logits[:, layer].astype(np.float32)         # [T, E]
        ids = trace.topk_ids[:, layer].astype(np.int64)                    # [T, k]
        assert np.all(np.sort(ids, -1)[:, 1:] != np.sort(ids, -1)[:, :-1])
        if arch == "deepseek_v3":
            bias = routers[layer][1].e_score_correction_bias.numpy()
            scores = 1 / (1 + np.exp(-logits)) + bias
            _groups_ok(scores, ids, cfg.n_group, cfg.topk_group, lambda g: np.sort(g, -1)[..., -2:].sum(-1))
            per = cfg.n_routed_experts // cfg.n_group
            gs = np.sort(scores.reshape(-1, cfg.n_group, per), -1)[..., -2:].sum(-1)
            allowed = np.repeat(gs >= np.sort(gs, -1)[:, -cfg.topk_group][:, None], per, axis=-1)
            _topk_ok(scores, ids, allowed)
        elif arch == "deepseek_v2":
            probs = torch.from_numpy(logits).softmax(-1).numpy()
            _groups_ok(probs, ids, cfg.n_group, cfg.topk_group, lambda g: g.max(-1))
            per = cfg.n_routed_experts // cfg.n_group
            gs = probs.reshape(-1, cfg.n_group, per).max(-1)
            allowed = np.repeat(gs >= np.sort(gs, -1)[:, -cfg.topk_group][:, None], per, axis=-1)
            _topk_ok(logits, ids, allowed)
        else:
            _topk_ok(logits, ids)
        expected = _expected_weights(arch, cfg, logits, ids)
        np.testing.assert_allclose(trace.topk_weights[:, layer].astype(np.float32), expected, atol=5e-3, rtol=2e-2)


def test_lookahead_is_next_routers_on_recorded_gate_inputs(recorded):
    """lookahead[d-1, :, l] = F.linear(gate_inputs[:, l], W(l+d)) for l+d < L, zeros beyond; logits likewise."""
    _, model, trace, _ = recorded
    weights = [router.weight.detach().float() for _, router in find_routers(model)]
    x_all = torch.from_numpy(trace.gate_inputs.astype(np.float32))        # [T, L, H]
    num_layers = trace.num_moe_layers
    assert trace.lookahead_logits.shape == (2, trace.num_tokens, num_layers, trace.num_experts)
    for layer in range(num_layers):
        own = F.linear(x_all[:, layer], weights[layer]).numpy()
        np.testing.assert_allclose(trace.router_logits[:, layer], own, atol=2e-2, rtol=2e-2)
        for d in (1, 2):
            got = trace.lookahead_logits[d - 1, :, layer].astype(np.float32)
            if layer + d >= num_layers:
                assert not got.any()
                continue
            want = F.linear(x_all[:, layer], weights[layer + d]).numpy()
            np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)
            assert np.abs(want).max() > 0.1  # not trivially zero
    if num_layers >= 2:  # the look-ahead differs from the layer's own logits
        assert not np.allclose(trace.lookahead_logits[0, :, 0], trace.router_logits[:, 0], atol=1e-2)


def test_recording_does_not_change_generation(recorded):
    """Decode token ids = a hook-free greedy loop that recomputes the whole sequence every step."""
    _, model, trace, _ = recorded
    for seq, span in enumerate(trace.sequence_slices()):
        prefill = trace.is_prefill[span].astype(bool)
        ids = [int(t) for t in trace.token_ids[span][prefill]]
        generated = []
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                logits = model(input_ids=torch.tensor([ids + generated]), use_cache=False).logits
                generated.append(int(logits[0, -1].argmax()))
        assert [int(t) for t in trace.token_ids[span][~prefill]] == generated, f"sequence {seq}"


def test_trace_layout_and_header(recorded, prompt_file):
    """Positions, prefill flags, model_config and provenance as the contract says; the file reads back."""
    arch, model, trace, path = recorded
    back = read_trace(path)
    assert back.content_hash() == trace.content_hash()
    cfg = back.model_config
    assert cfg.architecture == arch
    assert cfg.num_layers == model.config.num_hidden_layers
    assert cfg.moe_layer_indices == tuple(i for i, _ in find_routers(model))
    assert cfg.num_experts == 8 and cfg.top_k == 2 and cfg.hidden_size == 16
    assert cfg.dtype == "float32" and back.hf_config["dtype"] == "float32"   # as saved by _build
    if arch.startswith("deepseek"):
        assert cfg.moe_layer_indices[0] == 1 and cfg.num_shared_experts == 1
    assert back.num_sequences == len(PROMPTS)
    assert back.num_decode_tokens == NEW_TOKENS * len(PROMPTS)
    for span in back.sequence_slices():
        assert list(back.positions[span]) == list(range(span.stop - span.start))
    assert back.source["kind"] == "recorded" and back.source["lookahead"] == 2
    assert back.source["transformers"] == transformers.__version__
    assert back.hf_config["model_type"] == arch
    assert back.prompts == prompts_identity(prompt_file)


def test_stored_dtype_not_compute_dtype(tmp_path):
    """model_config.dtype is the dtype of the stored weights, though CPU recording computes in float32."""
    from traces.recorder import stored_dtype

    model = _build("mixtral", tmp_path / "m")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert stored_dtype(tmp_path / "m") == "float32"
    assert stored_dtype(tmp_path / "bf16") == "bfloat16"


def test_unsupported_architecture_is_a_user_error(tmp_path, prompt_file):
    """A dense Llama folder is refused, naming the supported model types."""
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    with pytest.raises(UserError, match="qwen2_moe, deepseek_v2, deepseek_v3, mixtral, olmoe, qwen3_moe"):
        record_trace(str(tmp_path / "llama"), prompt_file, tmp_path / "t.safetensors", progress=False)
    assert not (tmp_path / "t.safetensors").exists()


def test_user_errors_for_prompts_and_model_names(tmp_path, prompt_file):
    """Empty or missing prompt files and hub ids fail with UserError before any model runs."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match="no prompts"):
        load_prompts(empty)
    with pytest.raises(UserError, match="no prompts"):
        record_trace("mini-qwen-moe", empty, tmp_path / "t.safetensors", progress=False)
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="hub ids cannot be downloaded"):
        record_trace("Qwen/Qwen1.5-MoE-A2.7B", prompt_file, tmp_path / "t.safetensors", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "text": "ok"}\n{"id": 2}\n')
    with pytest.raises(UserError, match="line 2"):
        load_prompts(bad)


def test_plain_text_prompts(tmp_path):
    """A plain-text file gives one prompt per non-blank line; the identity hashes the bytes."""
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n\nsecond {prompt}\n")
    assert load_prompts(path) == ["first prompt", "second {prompt}"]
    ident = prompts_identity(path)
    assert ident["name"] == "p" and len(ident["sha256"]) == 64
