"""Issue 12 items 8-10, 12: outputs and arguments are checked before the work, an output never overwrites an
input, bad result files and windows are one-line errors, long commands show progress only on a terminal."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_structured_trace

from sim.cli import main
from sim.synthetic import synthetic_trace
from traces.format import write_trace

PNG = b"\x89PNG\r\n\x1a\n" + bytes(200)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def files(tmp_path):
    write_trace(make_structured_trace(num_sequences=4, seq_len=12), tmp_path / "s.safetensors")
    write_trace(make_structured_trace(num_sequences=2, seq_len=12, num_experts=12), tmp_path / "other.safetensors")
    write_trace(synthetic_trace(sequences=1, prompt_tokens=4, decode_tokens=6), tmp_path / "q.safetensors")
    return tmp_path


def _forbid(monkeypatch, target: str) -> None:
    """Make `module.attribute` fail the test if the command gets as far as calling it."""
    module, _, attribute = target.rpartition(".")

    def refuse(*args, **kwargs):
        raise AssertionError(f"{target} ran before the output path was checked")

    monkeypatch.setattr(f"{module}.{attribute}", refuse)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("argv, forbidden", [
    (["train-estimator", "--trace", "{s}", "--out", "{missing}/e.safetensors"], "sim.analysis.estimator.train_estimator"),
    (["train-estimator", "--trace", "{s}", "--out", "{dir}/e.safetensors", "--eval-trace", "{other}"],
     "sim.analysis.estimator.train_estimator"),
    (["analyze", "lrc", "--trace", "{s}", "--out", "{missing}/r.json"], "sim.analysis.lrc.trace_lrc"),
    (["analyze", "predictors", "--trace", "{s}", "--out", "{missing}/r.json"], "sim.analysis.predictors.predictor_report"),
    (["replay", "--trace", "{q}", "--timeline", "{missing}/t.json"], "sim.replay.load"),
    (["replay", "--trace", "{q}", "--timeline-window", "1:2"], "sim.replay.load"),
    (["replay", "--trace", "{q}", "--timeline", "{dir}/t.json", "--timeline-window", "2:1"], "sim.replay.load"),
    (["replay", "--trace", "{q}", "--policy", "nope"], "sim.replay.load"),
])
def test_mistakes_fail_before_the_work(files, capsys, monkeypatch, argv: list[str], forbidden: str) -> None:
    _forbid(monkeypatch, forbidden)
    names = {"s": files / "s.safetensors", "other": files / "other.safetensors", "q": files / "q.safetensors",
             "missing": files / "no" / "such", "dir": files}
    code, _, err = run([a.format(**names) for a in argv], capsys)
    assert code == 2, err
    assert err.startswith("fatesim: error: ") and err.count("\n") == 1


@pytest.mark.parametrize("argv, output", [
    (["replay", "--trace", "{q}", "--timeline", "{q}"], "q"),
    (["analyze", "lrc", "--trace", "{s}", "--out", "{s}"], "s"),
    (["analyze", "predictors", "--trace", "{s}", "--out", "{s}"], "s"),
    (["train-estimator", "--trace", "{s}", "--out", "{s}"], "s"),
    (["sweep", "--trace", "{q}", "--grid", "{grid}", "--out", "{grid}"], "grid"),
])
def test_an_output_over_an_input_is_refused_and_the_input_survives(files, capsys, argv, output) -> None:
    grid = files / "g.csv"  # a grid file that ends like a results file
    grid.write_text('policy = ["lod"]\n')
    names = {"s": files / "s.safetensors", "q": files / "q.safetensors", "grid": grid}
    before = sha(names[output])
    code, _, err = run([a.format(**names) for a in argv], capsys)
    assert code == 2 and "also an input of this command" in err and err.count("\n") == 1
    assert sha(names[output]) == before


def test_trace_import_refuses_to_write_over_a_source(tmp_path, capsys) -> None:
    src = tmp_path / "routing.jsonl"
    src.write_text('{"type": "route", "token_idx": 0, "layer": 0, "topk_ids": [1, 2], "topk_weights": [0.5, 0.5]}\n')
    before = sha(src)
    code, _, err = run(["trace", "import", "mixtral-jsonl", str(src), "--out", str(src)], capsys)
    assert code == 2 and "also an input" in err and sha(src) == before


def test_import_error_names_the_format_argument_not_an_option(tmp_path, capsys) -> None:
    """Issue 12 item 13: "is this the right --format?" for what is a positional argument."""
    src = tmp_path / "routing.jsonl"
    src.write_text('{"something": 1}\n')
    code, _, err = run(["trace", "import", "vllm-jsonl", str(src), "--out", str(tmp_path / "t.safetensors")], capsys)
    assert code == 2 and "right FORMAT" in err and "--format" not in err


@pytest.mark.parametrize("name", ["results.csv", "results.parquet"])
def test_plot_of_a_png_renamed_is_a_one_line_error(tmp_path, capsys, name: str) -> None:
    (tmp_path / name).write_bytes(PNG)
    code, _, err = run(["plot", str(tmp_path / name), "--out", str(tmp_path / "png")], capsys)
    assert code == 2 and f"is not a {name.split('.')[1]} table written by `fatesim sweep`" in err
    assert err.count("\n") == 1 and not (tmp_path / "png").exists()


@pytest.mark.parametrize("flag, value, message", [("--window-ms", "-3", "--window-ms must be more than 0"),
                                                  ("--window-ms", "0", "--window-ms must be more than 0"),
                                                  ("--start-ms", "-1", "--start-ms must be 0 or more")])
def test_plot_refuses_an_empty_window(tmp_path, capsys, flag: str, value: str, message: str) -> None:
    timeline = tmp_path / "t.json"
    timeline.write_text('{"traceEvents": [{"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 5, "name": "a"}]}')
    code, _, err = run(["plot", "--timeline", str(timeline), flag, value, "--out", str(tmp_path / "png")], capsys)
    assert code == 2 and message in err and not (tmp_path / "png").exists()


def test_a_csv_of_something_else_is_refused(tmp_path, capsys) -> None:
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    code, _, err = run(["plot", str(tmp_path / "x.csv"), "--out", str(tmp_path / "png")], capsys)
    assert code == 2 and "no 'policy' and 'status' columns" in err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_show_on_a_terminal_only_and_never_with_quiet(files, capsys, monkeypatch) -> None:
    trace = str(files / "s.safetensors")
    argv = ["analyze", "lrc", "--trace", trace, "--m", "4", "--rho", "2"]
    code, out, err = run(argv, capsys)  # pytest's stderr is not a terminal: no bar
    assert code == 0 and err == ""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    run(argv, capsys)
    assert "lrc:" in terminal.getvalue() and "/5 " in terminal.getvalue()  # m=4, rho=2: SRP, SCH, LRU, LFU, Belady
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    run(argv + ["--quiet"], capsys)
    assert quiet.getvalue() == ""


def test_progress_callbacks_count_the_work(files) -> None:
    from sim.analysis.estimator import train_estimator
    from sim.analysis.lrc import lrc_work_units, trace_lrc
    from sim.analysis.predictors import predictor_report, will_train
    from traces.format import read_trace

    trace = read_trace(files / "s.safetensors")
    ticks: list[int] = []
    train_estimator(trace, depth=1, steps=7, progress=ticks.append)
    assert ticks == [1] * 7
    ticks.clear()
    trace_lrc(trace, ms=[4, 8], rhos=[1, 2], progress=ticks.append)
    assert len(ticks) == lrc_work_units([4, 8], [1, 2], True) == 2 + 2 * (2 + 3)
    ticks.clear()
    assert will_train(trace, None, None)
    predictor_report(trace, estimator_steps=5, progress=ticks.append)
    assert len(ticks) == 5 + trace.num_moe_layers
    bare = dataclasses.replace(trace, gate_inputs=None)
    assert not will_train(bare, None, None)


def test_realrun_refuses_a_bad_policy_or_output_before_importing_torch(tmp_path) -> None:
    """Issue 12 item 15: `realrun --policy foo` answered after 18 s of imports and loading."""
    script = ("import sys\nfrom sim.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
              "print('torch' in sys.modules)")
    base = [sys.executable, "-c", script, "realrun", "--model", "mini-qwen-moe", "--prompts",
            "traces/prompts/default.jsonl", "--memory-budget", "25%"]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    for extra, message in ((["--policy", "foo"], "unknown policy 'foo'"),
                           (["--policy", "lru", "--timeline", str(tmp_path / "no" / "t.json")], "does not exist")):
        done = subprocess.run(base + extra, capture_output=True, text=True, check=False, cwd=root, env=env)
        assert message in done.stderr and done.stdout.strip() == "False", (done.stdout, done.stderr)
