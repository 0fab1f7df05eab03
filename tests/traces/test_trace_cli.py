"""`fatesim trace info|import|record` through the real CLI root (`sim.cli.main`): exit codes, one-line
errors on stderr, and the --json keys."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from sim.cli import main
from traces.format import read_trace

RAW = "Mario928__speculative-moe/analysis/deep_analysis/routing_raw.jsonl"


def run(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the fatesim CLI in-process; returns (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def imported(tmp_path: Path, realtraces: Path, capsys) -> Path:
    out = tmp_path / "raw.safetensors"
    code, stdout, stderr = run(["trace", "import", "mixtral-jsonl", str(realtraces / RAW), "--out", str(out)], capsys)
    assert code == 0, stderr
    assert stdout.startswith(f"wrote {out}: 94 tokens in 1 sequence, 32 MoE layers, 8 experts top-2")
    return out


def test_import_then_info_text(imported: Path, capsys) -> None:
    """`trace info` prints counts, layers and the importer's assumptions."""
    code, out, _ = run(["trace", "info", str(imported)], capsys)
    assert code == 0
    assert "tokens:     94 (59 prefill, 35 decode)" in out
    assert "moe layers: 32 of 32 decoder layers (0..31)" in out
    assert "dropped 124 of 218 tokens" in out


def test_info_json_keys(imported: Path, capsys) -> None:
    """--json prints one JSON object with the documented keys."""
    code, out, _ = run(["trace", "info", str(imported), "--json"], capsys)
    assert code == 0
    assert out.count("\n") == 1
    d = json.loads(out)
    for key in ("model", "source", "tokens", "sequences", "prefill_tokens", "decode_tokens", "moe_layers",
                "experts", "top_k", "lookahead_depth", "optional", "assumptions", "prompts", "created"):
        assert key in d, key
    assert (d["tokens"], d["sequences"], d["moe_layers"], d["experts"], d["top_k"]) == (94, 1, 32, 8, 2)
    assert d["lookahead_depth"] == 0 and d["optional"] == [] and d["source"]["kind"] == "imported"
    assert d["content_hash"] == read_trace(imported).content_hash()


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + bytes(64), b"hello world, not a trace"])
def test_info_on_bad_file_is_one_line_exit_2(tmp_path: Path, capsys, content: bytes) -> None:
    """An empty file, a PNG and a text file: exit 2, one line `fatesim: error: <file>: ...`."""
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    code, out, err = run(["trace", "info", str(path)], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"fatesim: error: {path}: ")


def test_import_user_errors(tmp_path: Path, realtraces: Path, capsys) -> None:
    """A spec with other routing, an unknown format, a missing --out and a missing source all exit 2."""
    out = tmp_path / "x.safetensors"
    code, _, err = run(["trace", "import", "mixtral-jsonl", str(realtraces / RAW), "--out", str(out),
                        "--model-spec", "deepseek-v2-lite"], capsys)
    assert code == 2 and err.count("\n") == 1 and "routes 64 experts top-6" in err
    assert not out.exists()
    code, _, err = run(["trace", "import", "csv", str(realtraces / RAW), "--out", str(out)], capsys)
    assert code == 2 and "'csv' is not one of" in err
    code, _, err = run(["trace", "import", "esft", str(realtraces / RAW)], capsys)
    assert code == 2 and "--out" in err
    code, _, err = run(["trace", "import", "esft", str(tmp_path / "nope"), "--out", str(out)], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run(["trace", "import", "esft", str(tmp_path), "--out", str(out), "--prompt-tokens", "-1"],
                       capsys)
    assert code == 2 and "--prompt-tokens" in err
    assert list(tmp_path.iterdir()) == []


def test_import_into_missing_folder(tmp_path: Path, realtraces: Path, capsys) -> None:
    """--out in a folder that does not exist: one-line error, exit 2."""
    code, _, err = run(["trace", "import", "mixtral-jsonl", str(realtraces / RAW), "--out",
                        str(tmp_path / "no" / "x.safetensors")], capsys)
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err


def test_record_passes_options_to_the_recorder(tmp_path: Path, monkeypatch, capsys) -> None:
    """`trace record` parses its options and calls traces.recorder.record_trace with them, nothing more."""
    calls = []
    trace = types.SimpleNamespace(num_tokens=3, num_sequences=1, num_moe_layers=2, num_experts=4, top_k=2)

    def record_trace(model, prompts_path, out, *, max_new_tokens, lookahead, gate_inputs, device, dtype,
                     memory_budget):
        calls.append((model, prompts_path, out, max_new_tokens, lookahead, gate_inputs, device, dtype, memory_budget))
        return trace

    monkeypatch.setitem(sys.modules, "traces.recorder", types.SimpleNamespace(record_trace=record_trace))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    out = tmp_path / "t.safetensors"
    code, stdout, err = run(["trace", "record", "--model", "mini-qwen-moe", "--prompts", str(prompts), "--out",
                             str(out), "--max-new-tokens", "7", "--lookahead", "3", "--gate-inputs"], capsys)
    assert code == 0, err
    assert calls == [("mini-qwen-moe", prompts, out, 7, 3, True, "cpu", "auto", None)]
    assert stdout.startswith(f"wrote {out}: 3 tokens")
    code, _, err = run(["trace", "record", "--model", "m", "--prompts", str(prompts), "--out", str(out),
                        "--dtype", "bfloat16", "--memory-budget", "10%"], capsys)
    assert code == 0, err
    assert calls[-1][-2:] == ("bfloat16", "10%")
    code, _, err = run(["trace", "record", "--model", "m", "--prompts", str(prompts), "--out", str(out),
                        "--device", "tpu"], capsys)
    assert code == 2 and "'tpu' is not one of" in err
