"""Importers on the real public routing logs in ../shared/realtraces (counts checked against each folder's
README) and on small hand-made logs that pin down the inference rules exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from traces.errors import UserError
from traces.format import Trace, read_trace, write_trace
from traces.importers import IMPORTERS, import_trace
from traces.importers.esft import import_esft
from traces.importers.mixtral_jsonl import import_mixtral_jsonl
from traces.importers.vllm_jsonl import import_vllm_jsonl

ESFT = "deepseek-ai__ESFT/expert_scores"
WEIRAN = "weiran0129__vLLM-MoE-Logger/Logs"
RODERICK = "Roderick-Wu__moe_expert_logger/run_generate"
MARIO = "Mario928__speculative-moe"


def lengths(trace: Trace) -> list[int]:
    return [s.stop - s.start for s in trace.sequence_slices()]


@pytest.fixture(scope="module")
def intent(realtraces: Path) -> Trace:
    return import_esft([realtraces / ESFT / "intent"])


@pytest.fixture(scope="module")
def weiran(realtraces: Path) -> Trace:
    return import_vllm_jsonl(sorted((realtraces / WEIRAN).glob("moe_layer*.jsonl")))


# ---- ESFT -------------------------------------------------------------------------------------------------


def test_esft_intent_counts(intent: Trace) -> None:
    """intent: 127 sequences, 8,222 tokens, lengths 47..88, 26 MoE layers (1..26 of 27), 64 experts top-6."""
    assert (intent.num_sequences, intent.num_tokens) == (127, 8222)
    assert (min(lengths(intent)), max(lengths(intent))) == (47, 88)
    assert (intent.num_moe_layers, intent.num_experts, intent.top_k) == (26, 64, 6)
    assert intent.model_config.moe_layer_indices == tuple(range(1, 27))
    assert intent.model_config.num_layers == 27 and intent.model == "deepseek-v2-lite"
    assert intent.num_prefill_tokens == 8222 and intent.num_decode_tokens == 0
    assert (intent.token_ids == -1).all()
    assert any("every position is taken as prefill" in a for a in intent.source["assumptions"])


def test_esft_values_match_the_text(intent: Trace, realtraces: Path) -> None:
    """Token 0 of sequence 0 in MoE layer 1 and the last token in layer 26 are the files' own numbers."""
    first = (realtraces / ESFT / "intent" / "expert_weights_1.txt").read_text().splitlines()[0]
    ids, weights = first.split("\t\t")
    assert intent.topk_ids[0, 0].tolist() == [int(x) for x in ids.split("\t")[:6]]
    np.testing.assert_allclose(intent.topk_weights[0, 0], [float(x) for x in weights.split("\t")[:6]], rtol=1e-3)
    last = (realtraces / ESFT / "intent" / "expert_weights_26.txt").read_text().splitlines()[-1]
    assert intent.topk_ids[-1, -1].tolist() == [int(x) for x in last.split("\t\t")[0].split("\t")[-6:]]


def test_esft_law_and_both_tasks(realtraces: Path) -> None:
    """law: 33 sequences, 8,327 tokens (125..580); both folders together: 160 sequences, 16,549 tokens."""
    law = import_esft([realtraces / ESFT / "law"], prompt_tokens=32)
    assert (law.num_sequences, law.num_tokens) == (33, 8327)
    assert (min(lengths(law)), max(lengths(law))) == (125, 580)
    assert law.num_prefill_tokens == 33 * 32
    assert law.is_prefill[law.sequence_slices()[0]].tolist()[30:34] == [1, 1, 0, 0]
    assert any("--prompt-tokens 32" in a for a in law.source["assumptions"])
    both = import_esft([realtraces / ESFT / "intent", realtraces / ESFT / "law"])
    assert (both.num_sequences, both.num_tokens) == (160, 16549)


def test_esft_model_spec(realtraces: Path) -> None:
    """A spec with other routing is refused; deepseek-moe-16b (64 experts top-6, MoE layers 1..27) fits."""
    with pytest.raises(UserError, match="qwen1.5-moe-a2.7b routes 60 experts top-4"):
        import_esft([realtraces / ESFT / "intent"], model_spec="qwen1.5-moe-a2.7b")
    trace = import_esft([realtraces / ESFT / "intent"], model_spec="deepseek-moe-16b")
    assert trace.model_config.num_layers == 28 and trace.model == "deepseek-ai/ESFT-vanilla-lite"
    assert any("only MoE layers" in a for a in trace.source["assumptions"])


def test_esft_malformed(tmp_path: Path) -> None:
    """A folder without logs, a line without the double tab and layers of different lengths are named."""
    with pytest.raises(UserError, match="no expert_weights_<layer>.txt"):
        import_esft([tmp_path])
    (tmp_path / "expert_weights_1.txt").write_text("1\t2\t3\t4\t5\t6\t\t.1\t.1\t.1\t.1\t.1\t.1\n")
    (tmp_path / "expert_weights_2.txt").write_text("1\t2\t3\t4\t5\t6\t1\t2\t3\t4\t5\t6\t\t" + "\t".join(["0.1"] * 12))
    with pytest.raises(UserError, match="expert_weights_2.txt:1: 2 tokens, but .*expert_weights_1.txt has 1"):
        import_esft([tmp_path])
    (tmp_path / "expert_weights_2.txt").write_text("1\t2\t3\n")
    with pytest.raises(UserError, match="expert_weights_2.txt:1: expected"):
        import_esft([tmp_path])
    (tmp_path / "expert_weights_2.txt").write_text("1\t2\t3\t4\t5\t64\t\t.1\t.1\t.1\t.1\t.1\t.1\n")
    with pytest.raises(UserError, match=r"outside \[0, 64\)"):
        import_esft([tmp_path])


# ---- vLLM single-layer logs --------------------------------------------------------------------------------


def test_vllm_five_layers_of_weiran(weiran: Trace) -> None:
    """5 files, 4,357 real rows after dropping 8,448 dummy rows each; prefill steps 65 + 1406; 25 slots."""
    assert weiran.num_tokens == 4357 and weiran.num_moe_layers == 5
    assert weiran.model_config.moe_layer_indices == (0, 8, 12, 18, 23)
    assert (weiran.num_experts, weiran.top_k) == (60, 4)
    assert (weiran.num_prefill_tokens, weiran.num_decode_tokens) == (1471, 2886)
    assert lengths(weiran)[:3] == [65, 1406, 127] and weiran.num_sequences == 2 + 25
    assert weiran.source["engine_steps"]["prefill_rows"] == [65, 1406]
    assert len(weiran.source["engine_steps"]["decode_rows"]) == 127
    text = " ".join(weiran.source["assumptions"])
    assert "dropped 8448 dummy rows" in text and "5 separate runs" in text and "only MoE layers" in text
    assert weiran.model == "Qwen/Qwen1.5-MoE-A2.7B-Chat"  # not the full model: sim must not take the built-in


def test_vllm_rows_land_where_they_belong(weiran: Trace, realtraces: Path) -> None:
    """Real row 0 of layer 8's file is token 0, MoE layer 1; decode step 0's row 1 starts sequence 3."""
    rows = [json.loads(line) for line in (realtraces / WEIRAN / "moe_layer8.jsonl").open()][1:]
    real = rows[8448:]
    assert weiran.topk_ids[0, 1].tolist() == real[0]["topk_ids"]
    slot1 = weiran.sequence_slices()[3]
    assert weiran.topk_ids[slot1.start, 1].tolist() == real[65 + 1406 + 1]["topk_ids"]
    assert weiran.positions[slot1.start] == 0 and weiran.is_prefill[slot1.start] == 0


def test_vllm_single_files(realtraces: Path) -> None:
    """KennethWang1221 (3 dummy blocks, 4,384 real rows) and Roderick-Wu layer 23 (prefill 148 + 1325)."""
    kenneth = import_vllm_jsonl([realtraces / "KennethWang1221__vllm-expert-profiler" / "moe_routes.jsonl"])
    assert kenneth.num_tokens == 4384 and kenneth.model_config.moe_layer_indices == (0,)
    assert "dropped 16640 dummy rows" in " ".join(kenneth.source["assumptions"])
    layer23 = import_vllm_jsonl([realtraces / RODERICK / "vllm_moe_log_layer23.jsonl"])
    assert layer23.num_tokens == 4331 and lengths(layer23)[:2] == [148, 1325]
    assert layer23.model_config.moe_layer_indices == (23,)


def test_vllm_refusals(realtraces: Path) -> None:
    """Runs with different step structures, the same layer twice and the broken TotaniYash log are refused."""
    with pytest.raises(UserError, match="the runs differ, so their rows cannot be aligned"):
        import_vllm_jsonl([realtraces / RODERICK / "vllm_moe_log_layer0.jsonl",
                           realtraces / RODERICK / "vllm_moe_log_layer23.jsonl"])
    layer0 = realtraces / WEIRAN / "moe_layer0.jsonl"
    with pytest.raises(UserError, match="both log layer 0"):
        import_vllm_jsonl([layer0, layer0])
    with pytest.raises(UserError, match="not one batched generate"):
        import_vllm_jsonl([realtraces / "TotaniYash__vllm_moe_routelogging_patch" / "moe_routes.jsonl"])
    with pytest.raises(UserError, match="top-8 routing"):  # an OLMoE log is not Qwen1.5-MoE
        import_vllm_jsonl([realtraces / "KaxitPandya__cerebras-assesment2" / "moe_routes.jsonl"])


def write_vllm(path: Path, steps: list[int], *, layer: int = 3, dummy: int = 20, seed: int = 0) -> list[list[int]]:
    """A tiny log: one dummy step of identical rows, then real steps of the given sizes; returns real ids."""
    rng = np.random.default_rng(seed)
    lines = [json.dumps({"type": "meta", "model_id": "Qwen/Qwen1.5-MoE-A2.7B-Chat", "layers_logged": [layer]})]
    lines += [json.dumps({"type": "route", "req_id": "r", "token_idx": i, "layer": layer,
                          "topk_ids": [1, 2, 3, 4], "topk_weights": [0.1] * 4}) for i in range(dummy)]
    real = []
    for size in steps:
        for i in range(size):
            ids = rng.permutation(60)[:4].tolist()
            real.append(ids)
            lines.append(json.dumps({"type": "route", "req_id": "r", "token_idx": i, "layer": layer,
                                     "topk_ids": ids, "topk_weights": [0.2, 0.1, 0.1, 0.05]}))
    path.write_text("\n".join(lines) + "\n")
    return real


def test_vllm_sequences_from_step_structure(tmp_path: Path) -> None:
    """Steps [5, 9 | 3, 3, 2]: two prefill sequences, then slots 0, 1, 2 with 3, 3 and 2 decode tokens."""
    real = write_vllm(tmp_path / "l3.jsonl", [5, 9, 3, 3, 2])
    trace = import_vllm_jsonl([tmp_path / "l3.jsonl"])
    assert lengths(trace) == [5, 9, 3, 3, 2]
    assert trace.is_prefill.tolist() == [1] * 14 + [0] * 8
    slot1 = trace.sequence_slices()[3]
    assert trace.topk_ids[slot1, 0].tolist() == [real[14 + 1], real[17 + 1], real[20 + 1]]
    assert trace.positions[slot1].tolist() == [0, 1, 2]


def test_vllm_bad_logs(tmp_path: Path) -> None:
    """Growing decode steps, broken JSON and a file mixing layers are refused with file (and line)."""
    write_vllm(tmp_path / "a.jsonl", [5, 9, 3, 4])
    with pytest.raises(UserError, match="decode step 1 has 4 rows after 3"):
        import_vllm_jsonl([tmp_path / "a.jsonl"])
    (tmp_path / "b.jsonl").write_text('{"type": "route", "token_idx": 0, "layer": 0, "topk_ids": [1,2,3,4], '
                                      '"topk_weights": [1,1,1,1]}\n{oops\n')
    with pytest.raises(UserError, match="b.jsonl:2: not a JSON line"):
        import_vllm_jsonl([tmp_path / "b.jsonl"])
    write_vllm(tmp_path / "c.jsonl", [5, 2])
    with open(tmp_path / "c.jsonl", "a") as f:
        f.write(json.dumps({"type": "route", "token_idx": 0, "layer": 4, "topk_ids": [1, 2, 3, 5],
                            "topk_weights": [1, 1, 1, 1]}) + "\n")
    with pytest.raises(UserError, match="rows of layers \\[3, 4\\]"):
        import_vllm_jsonl([tmp_path / "c.jsonl"])


# ---- Mixtral (Mario928) -----------------------------------------------------------------------------------


def test_mixtral_decode_only_files(realtraces: Path) -> None:
    """humaneval_2: problems of 81..83 and 252..255 rows per layer -> 81 + 252 tokens, 123 of 10,779 rows
    dropped; gsm8k_2: 166 + 78 tokens. 32 layers, 8 experts, top-2, all decode."""
    folder = realtraces / MARIO / "routing_data_collected"
    trace = import_mixtral_jsonl([folder / "humaneval_2_routing.jsonl", folder / "gsm8k_2_routing.jsonl"])
    assert lengths(trace) == [81, 252, 166, 78]
    assert (trace.num_moe_layers, trace.num_experts, trace.top_k) == (32, 8, 2)
    assert trace.model == "mixtral-8x7b" and trace.num_prefill_tokens == 0
    text = " ".join(trace.source["assumptions"])
    assert "dropped 123 of 10779 rows" in text and "dropped 81 of 7889 rows" in text
    assert [s["problem_id"] for s in trace.source["sequences"]] == [0, 1, 0, 1]


def test_mixtral_raw_prefill_and_decode(realtraces: Path) -> None:
    """routing_raw: 135 prefill + 83 decode tokens, 6,777 of 6,976 rows; tokens lacking a row in any layer
    are dropped: 59 prefill + 35 decode kept."""
    trace = import_mixtral_jsonl([realtraces / MARIO / "analysis/deep_analysis/routing_raw.jsonl"])
    assert (trace.num_prefill_tokens, trace.num_decode_tokens) == (59, 35)
    assert trace.positions.tolist() == list(range(94))
    assert "dropped 124 of 218 tokens (76 prefill, 48 decode)" in " ".join(trace.source["assumptions"])
    first = json.loads((realtraces / MARIO / "analysis/deep_analysis/routing_raw.jsonl").open().readline())
    assert first["token_pos"] == 0 and trace.topk_ids[0, 0].tolist() == first["experts"]


def test_mixtral_refusals(tmp_path: Path, realtraces: Path) -> None:
    """A spec with other routing, and a file of another layout, are refused."""
    raw = realtraces / MARIO / "analysis/deep_analysis/routing_raw.jsonl"
    with pytest.raises(UserError, match="deepseek-v2-lite routes 64 experts top-6"):
        import_mixtral_jsonl([raw], model_spec="deepseek-v2-lite")
    with pytest.raises(UserError, match="neither token_idx"):
        import_mixtral_jsonl([realtraces / MARIO / "routing_data_collected/gsm8k_2_outputs.jsonl"])


# ---- registry -------------------------------------------------------------------------------------------


def test_registry_and_file_round_trip(tmp_path: Path, realtraces: Path) -> None:
    """The three formats are registered; an imported trace survives write + read with the same hash."""
    assert set(IMPORTERS) == {"esft", "vllm-jsonl", "mixtral-jsonl"}
    with pytest.raises(UserError, match="unknown import format 'csv'"):
        import_trace("csv", [tmp_path])
    trace = import_trace("mixtral-jsonl", [realtraces / MARIO / "analysis/deep_analysis/routing_raw.jsonl"])
    write_trace(trace, tmp_path / "m.safetensors")
    back = read_trace(tmp_path / "m.safetensors")
    assert back.content_hash() == trace.content_hash() and back.source == trace.source
