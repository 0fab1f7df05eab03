"""The analysis commands through the CLI root: JSON output, files, exit codes and one-line errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import make_structured_trace

from sim.cli import main
from sim.synthetic import synthetic_trace
from traces.format import write_trace


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
        raise SystemExit(0)
    out = capsys.readouterr()
    return int(exit_info.value.code or 0), out.out, out.err


@pytest.fixture
def traces_dir(tmp_path):
    write_trace(make_structured_trace(num_sequences=4, seq_len=20), tmp_path / "s.safetensors")
    write_trace(make_structured_trace(token_seed=5, num_sequences=4, seq_len=20), tmp_path / "s2.safetensors")
    bare = dataclasses.replace(make_structured_trace(num_sequences=2), lookahead_logits=None, gate_inputs=None)
    write_trace(bare, tmp_path / "bare.safetensors")
    write_trace(synthetic_trace(num_layers=4, num_experts=8, top_k=2, sequences=1, prompt_tokens=4, decode_tokens=8,
                                model="tiny-moe", hidden_size=256, expert_intermediate_size=512,
                                shared_expert_intermediate_size=0), tmp_path / "tiny.safetensors")
    return tmp_path


def test_lrc_json_and_table(traces_dir, capsys) -> None:
    code, out, _ = run(["analyze", "lrc", "--trace", str(traces_dir / "s.safetensors"), "--m", "4,8",
                        "--rho", "1,2", "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and set(report["model"]["sch"]) == {"1", "2"} and set(report["model"]["srp"]) == {"4", "8"}
    assert len(report["layers"]) == 4 and 0 <= report["model"]["belady"]["2"] <= 1
    code, out, _ = run(["analyze", "lrc", "--trace", str(traces_dir / "s.safetensors")], capsys)
    assert code == 0 and out.splitlines()[-1].startswith("model")


def test_errors_are_one_line_exit_2(traces_dir, capsys) -> None:
    cases = [
        ["analyze", "lrc", "--trace", str(traces_dir / "missing.safetensors")],
        ["analyze", "lrc", "--trace", str(traces_dir / "s.safetensors"), "--rho", "0.5"],
        ["analyze", "predictors", "--trace", str(traces_dir / "bare.safetensors"), "--predictor", "gate"],
        ["train-estimator", "--trace", str(traces_dir / "bare.safetensors"), "--out", str(traces_dir / "e.safetensors")],
        ["train-estimator", "--trace", str(traces_dir / "s.safetensors"), "--out", str(traces_dir / "no" / "e.safetensors"),
         "--steps", "2"],
        ["plot", str(traces_dir / "none.csv"), "--out", str(traces_dir / "png")],
        ["plan", "--model", "qwen1.5-moe-a2.7b", "--hw", "rtx3090-bound"],
    ]
    for argv in cases:
        code, _, err = run(argv, capsys)
        assert code == 2, argv
        assert err.startswith("fatesim: error: ") and err.count("\n") == 1, (argv, err)


def test_train_then_evaluate_estimator(traces_dir, capsys) -> None:
    est = traces_dir / "e.safetensors"
    code, out, _ = run(["train-estimator", "--trace", str(traces_dir / "s.safetensors"), "--out", str(est),
                        "--depth", "1", "--steps", "60", "--eval-trace", str(traces_dir / "s2.safetensors")], capsys)
    assert code == 0 and est.is_file() and "learned_d1" in out
    code, out, _ = run(["analyze", "predictors", "--trace", str(traces_dir / "s2.safetensors"), "--estimator", str(est),
                        "--json"], capsys)
    model = json.loads(out)["model"]["predictors"]
    assert model["learned_d1"]["decode"]["topk"]["precision"] > model["popularity"]["decode"]["topk"]["precision"]


def test_sweep_exit_1_when_a_configuration_fails(traces_dir, capsys) -> None:
    grid = traces_dir / "g.toml"
    grid.write_text('policy = ["lod", "lru"]\nbudget = ["0%", "100%"]\n')
    code, out, err = run(["sweep", "--trace", str(traces_dir / "tiny.safetensors"), "--grid", str(grid),
                          "--out", str(traces_dir / "r.csv"), "--no-progress"], capsys)
    assert code == 1 and "2 failed" in out and err.count("failed: ") == 2
    assert (traces_dir / "r.csv").is_file()


def test_replay_uses_a_trained_estimator_as_its_predictor(traces_dir, capsys) -> None:
    """`fatesim replay --estimator` makes the learned predictor drive prefetch (and refuses a mismatched one)."""
    est = traces_dir / "e.safetensors"
    code, _, _ = run(["train-estimator", "--trace", str(traces_dir / "s.safetensors"), "--out", str(est),
                      "--depth", "1", "--steps", "50"], capsys)
    assert code == 0
    code, out, _ = run(["replay", "--trace", str(traces_dir / "s2.safetensors"), "--policy", "lru",
                        "--set", "prefetch=topk", "--estimator", str(est), "--hw", "rtx3090-bound",
                        "--memory-budget", "50%", "--json"], capsys)
    metrics = json.loads(out)
    assert code == 0 and metrics["policy_components"]["prediction"] == "learned"
    assert metrics["prefetch_precision"] > 0.2
    other = traces_dir / "other.safetensors"
    write_trace(make_structured_trace(num_sequences=2, num_experts=8), other)
    code, _, err = run(["replay", "--trace", str(other), "--estimator", str(est)], capsys)
    assert code == 2 and "16 experts" in err and len(err.strip().splitlines()) == 1
