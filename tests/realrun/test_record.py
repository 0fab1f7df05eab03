"""Recording through realrun's streaming loader (`fatesim trace record --memory-budget`, issue 10 item 4).

The offloaded recording must give the trace the in-memory recorder gives: the same routed ids and
weights, router logits, look-ahead logits and gate inputs (`Trace.content_hash` covers every tensor),
while its routed experts come from the checkpoint on demand into a budget smaller than the experts.
"""

from __future__ import annotations

import json

import pytest

from sim.cli import main as fatesim
from traces.errors import UserError
from traces.format import read_trace
from traces.promptset import DEFAULT_PROMPTS, load_prompts
from traces.recorder import record_trace


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in load_prompts(DEFAULT_PROMPTS)[:2]))
    return path


@pytest.mark.parametrize("name", ["mini-qwen-moe", "mini-deepseek-moe"])
def test_offloaded_recording_equals_the_in_memory_one(name, prompts, tmp_path) -> None:
    options = dict(max_new_tokens=3, lookahead=2, gate_inputs=True, progress=False)
    in_memory = record_trace(name, prompts, tmp_path / "a.safetensors", **options)
    offloaded = record_trace(name, prompts, tmp_path / "b.safetensors", memory_budget="10%", **options)
    assert offloaded.content_hash() == in_memory.content_hash()
    back = read_trace(tmp_path / "b.safetensors")
    assert back.gate_inputs is not None and back.lookahead_logits is not None
    assert "streaming loader" in back.source["loader"] and "from_pretrained" in in_memory.source["loader"]
    assert back.source["compute_dtype"] == "float32"


def test_token_id_prompts_record_a_folder_without_tokenizer(tmp_path) -> None:
    """A checkpoint folder without a tokenizer (as `make bench-scale` writes) records from token ids."""
    import shutil

    from traces.modelzoo import resolve_model

    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(resolve_model("mini-qwen-moe") / name, folder / name)
    prompts = tmp_path / "ids.jsonl"
    prompts.write_text('{"token_ids": [5, 17, 300, 2]}\n{"token_ids": [9, 9, 40]}\n')
    trace = record_trace(str(folder), prompts, tmp_path / "t.safetensors", max_new_tokens=2, lookahead=1,
                         progress=False, memory_budget="20%")
    assert trace.token_ids[:4].tolist() == [5, 17, 300, 2] and trace.num_sequences == 2
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "hello"}\n')
    with pytest.raises(UserError, match="no tokenizer"):
        record_trace(str(folder), text, tmp_path / "u.safetensors", max_new_tokens=1, progress=False,
                     memory_budget="20%")


def test_budget_below_one_layer_is_refused_before_loading(prompts, tmp_path, capsys) -> None:
    out = tmp_path / "t.safetensors"
    with pytest.raises(SystemExit) as code:
        fatesim(["trace", "record", "--model", "mini-qwen-moe", "--prompts", str(prompts), "--out", str(out),
                 "--max-new-tokens", "1", "--memory-budget", "1KB"])
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fatesim: error: ") and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == [prompts]
