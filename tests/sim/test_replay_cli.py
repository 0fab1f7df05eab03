"""`fatesim replay`, `policies` and `profiles` through the CLI root: output, JSON, exit code 2 on bad input."""

from __future__ import annotations

import json

import pytest

from sim.cli import main
from sim.policies.presets import PRESETS
from sim.synthetic import synthetic_trace
from tests.cli_run import run_cli as _run
from traces.format import write_trace


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "syn.safetensors"
    write_trace(synthetic_trace(sequences=1, prompt_tokens=8, decode_tokens=20, seed=2), path)
    return path


def test_replay_prints_a_short_table(capsys, trace_file, tmp_path) -> None:
    timeline = tmp_path / "t.json"
    code, out, err = _run(capsys, ["replay", "--trace", str(trace_file), "--policy", "fate", "--hw", "rtx3090-bound",
                                   "--memory-budget", "25%", "--timeline", str(timeline)])
    assert code == 0, err
    for label in ("policy", "memory budget", "prefill", "decode", "hit rate", "prefetch", "bytes moved", "GPU stall"):
        assert label in out
    assert json.loads(timeline.read_text())["traceEvents"]


def test_replay_json_and_set(capsys, trace_file) -> None:
    code, out, err = _run(capsys, ["replay", "--trace", str(trace_file), "--policy", "fate", "--memory-budget",
                                   "6GiB", "--set", "eviction=lru", "--set", "int2_rate=0.5", "--json"])
    assert code == 0, err
    m = json.loads(out)
    assert m["policy_components"]["eviction"] == "lru" and m["policy_components"]["int2_rate"] == 0.5
    assert m["memory_budget_bytes"] == 6 * 2**30


@pytest.mark.parametrize("extra, message", [
    (["--policy", "nope"], "unknown policy 'nope'; choose one of"),
    (["--hw", "nope"], "unknown hardware profile 'nope'"),
    (["--memory-budget", "100MB"], "raise --memory-budget"),
    (["--policy", "lru", "--memory-budget", "3%"], "fewer than top-4 experts"),
    (["--as-model", "mixtral-8x7b"], "same routing structure"),
    (["--set", "eviction"], "write key=value"),
    (["--set", "evict=lru"], "unknown key"),
    (["--set", "eviction=fifo"], "choose one of lru, lfu, arc, belady, none"),
])
def test_bad_input_exits_2_with_one_line(capsys, trace_file, extra: list[str], message: str) -> None:
    code, out, err = _run(capsys, ["replay", "--trace", str(trace_file)] + extra)
    assert code == 2
    assert err.startswith("fatesim: error: ") and err.count("\n") == 1 and message in err


def test_missing_trace_file_exits_2(capsys, tmp_path) -> None:
    code, _, err = _run(capsys, ["replay", "--trace", str(tmp_path / "none.safetensors")])
    assert code == 2 and err.count("\n") == 1


def test_policies_and_profiles_list_everything(capsys) -> None:
    code, out, _ = _run(capsys, ["policies"])
    assert code == 0 and all(f"{name}:" in out for name in PRESETS) and "source:" in out
    code, out, _ = _run(capsys, ["profiles", "--json"])
    assert code == 0
    profiles = json.loads(out)
    assert "rtx3090-bound" in profiles and "gtx1080ti-bound" in profiles
    assert all(p["provenance"] for p in profiles.values())


def test_compare_prints_one_table_with_speedups(trace_file, capsys) -> None:
    """`fatesim compare` (what `make demo` runs): a row per policy, speedups over the first."""
    from sim.compare import compare, format_comparison

    results = compare(str(trace_file), ["lod", "lru", "fate"], memory_budget="25%").results
    table = format_comparison(results).splitlines()
    assert table[0].split()[:3] == ["policy", "prefill", "tok/s"]
    assert [line.split()[0] for line in table[1:4]] == ["lod", "lru", "fate"]
    assert table[1].split()[-2:] == ["1.00", "1.00"]
    fate_decode = float(table[3].split()[-1])
    assert fate_decode == pytest.approx(results[2]["decode_tokens_per_s"] / results[0]["decode_tokens_per_s"], abs=0.01)


def test_compare_refuses_unknown_policy_with_exit_2(trace_file, capsys) -> None:

    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--trace", str(trace_file), "--policies", "lod,nope"])
    assert exit_.value.code == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err


def test_compare_entries_take_overrides_and_keep_their_label(trace_file) -> None:
    """`oracle:precision=int4` is the oracle moving int4 bytes: a row of its own, fewer bytes than bf16."""
    from sim.compare import compare

    bf16, int4 = compare(str(trace_file), ["oracle", "oracle:precision=int4"], memory_budget="25%").results
    assert (bf16["policy"], int4["policy"]) == ("oracle", "oracle:precision=int4")
    assert int4["policy_components"]["precision"] == "int4"
    assert int4["bytes_transferred"]["total"] < bf16["bytes_transferred"]["total"]


def test_models_lists_every_built_in_spec(capsys) -> None:
    """Issue 12 item 13: no command listed the model names that --as-model and plan --model take."""
    from sim.modelspec import get_model_spec, list_model_specs

    code, out, _ = _run(capsys, ["models"])
    assert code == 0 and all(f"{name}: " in out for name in list_model_specs())
    assert "24 MoE layers of 24 (0..23), 60 experts top-4, 1 shared" in out
    code, out, _ = _run(capsys, ["models", "--json"])
    rows = {r["name"]: r for r in json.loads(out)}
    spec = get_model_spec("deepseek-v2-lite")
    assert rows["deepseek-v2-lite"]["moe_layer_indices"] == list(range(1, 27))
    assert rows["deepseek-v2-lite"]["expert_bytes"]["int4"] == spec.expert_bytes("int4")


@pytest.mark.parametrize("argv, absent, present", [
    (["realrun", "--help"], "traces.modelzoo", "mini-qwen-moe"),
    (["sweep", "--help"], None, "bytes/s"),
    (["plan", "--help"], "replay --help", "fatesim models"),
])
def test_help_texts(capsys, argv: list[str], absent: str | None, present: str) -> None:
    code, out, _ = _run(capsys, argv)
    text = " ".join(out.split())
    assert code == 0 and present in text and (absent is None or absent not in text)


def test_header_names_the_effective_components(capsys, trace_file) -> None:
    """Issue 12 item 14: the header said "fate" whatever --set changed."""
    code, out, err = _run(capsys, ["replay", "--trace", str(trace_file), "--policy", "fate", "--set", "eviction=lru",
                                   "--set", "int2_rate=0.5"])
    assert code == 0, err
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert lines["policy"].split(None, 1)[1].startswith("fate + eviction=lru, int2_rate=0.5 on rtx3090-bound")
    assert ("allocation=shallow eviction=lru prediction=crosslayer prefetch=fate precision=fate-hybrid miss=lowbit"
            in lines["components"])
    code, out, _ = _run(capsys, ["replay", "--trace", str(trace_file), "--policy", "fate"])
    assert "policy         fate on rtx3090-bound" in out


@pytest.mark.parametrize("prompt_tokens, decode_tokens, missing", [(0, 12, "prefill"), (16, 0, "decode")])
def test_a_missing_phase_is_a_dash_not_zero(capsys, tmp_path, prompt_tokens, decode_tokens, missing) -> None:
    """Issue 12 item 14: a decode-only (prefill-only) trace printed "0.0 tok/s" for the phase it lacks."""
    path = tmp_path / "t.safetensors"
    write_trace(synthetic_trace(sequences=2, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, seed=3), path)
    code, out, err = _run(capsys, ["replay", "--trace", str(path), "--policy", "lru"])
    assert code == 0, err
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert lines[missing].split(None, 1)[1].strip().startswith(f"– (no {missing} tokens in the trace)")
    assert "tokens/s" in lines["decode" if missing == "prefill" else "prefill"]
    code, out, _ = _run(capsys, ["compare", "--trace", str(path), "--policies", "lod,lru", "--quiet"])
    row = out.splitlines()[2].split()
    column = 1 if missing == "prefill" else 2
    assert row[0] == "lru" and row[column] == "–" and row[-2 if missing == "prefill" else -1] == "–"
    m = json.loads(_run(capsys, ["replay", "--trace", str(path), "--policy", "lru", "--json"])[1])
    assert m[f"{missing}_tokens"] == 0 and m[f"{missing}_tokens_per_s"] == 0.0


def test_a_cache_that_never_fills_is_a_warning(capsys, trace_file) -> None:
    """Issue 12 item 14: `--set miss=cpu` with lru computed every miss on the CPU and left the budget unused."""
    code, out, err = _run(capsys, ["replay", "--trace", str(trace_file), "--policy", "lru", "--set", "miss=cpu"])
    assert code == 0, err
    warning = [line for line in out.splitlines() if line.startswith("warning")]
    assert len(warning) == 1 and "the expert cache stayed empty" in warning[0]
    assert "miss=cpu computes every miss on the CPU" in warning[0] and "allocation=popularity" in warning[0]
    m = json.loads(_run(capsys, ["replay", "--trace", str(trace_file), "--policy", "lru", "--set", "miss=cpu",
                                 "--json"])[1])
    assert m["peak_expert_bytes"] == 0 and len(m["warnings"]) == 1 and m["hit_rate"] == 0.0
    cpu_exec = json.loads(_run(capsys, ["replay", "--trace", str(trace_file), "--policy", "cpu-exec", "--json"])[1])
    assert cpu_exec["warnings"] == [] and cpu_exec["peak_expert_bytes"] > 0


def test_calibrate_help_and_the_readme_give_the_same_duration(capsys) -> None:
    """Issue 12 item 13: `calibrate --help` said about five minutes, the README about one."""
    from pathlib import Path

    code, out, _ = _run(capsys, ["calibrate", "--help"])
    help_text = " ".join(out.split())
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    assert code == 0 and "about 25 s of CPU time instead of about 2 minutes" in help_text
    assert "about 2 minutes of CPU time on one core (--quick: about 25 s)" in readme
