"""`fatesim trace`: inspect (`info`), import (`import`) and record (`record`) routing traces.

Each command parses its options and calls one library function; every mistake a user can make is a
`UserError`, which the CLI root prints as one line and exits with code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from traces.format import read_trace
from traces.importers import IMPORTERS, import_trace
from traces.importers.common import KNOWN_MODELS
from traces.info import format_summary, summarize


@click.group()
def trace() -> None:
    """Record, import and inspect routing traces (format v1, .safetensors)."""


def _done(out: Path, t) -> str:
    seqs = f"{t.num_sequences:,} sequence{'s' if t.num_sequences != 1 else ''}"
    return (f"wrote {out}: {t.num_tokens:,} tokens in {seqs}, {t.num_moe_layers} MoE layers, "
            f"{t.num_experts} experts top-{t.top_k} (see `fatesim trace info {out}`)")


@trace.command("info")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one line of JSON instead of text.")
def info(file: Path, as_json: bool) -> None:
    """Validate trace FILE and print a summary: counts, layers, experts, provenance, assumptions."""
    summary = summarize(read_trace(file))
    click.echo(json.dumps(summary) if as_json else format_summary(summary))


@trace.command("import")
@click.argument("fmt", metavar="FORMAT", type=click.Choice(list(IMPORTERS)))
@click.argument("sources", metavar="SRC...", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Trace file to write (.safetensors); written atomically.")
@click.option("--model-spec", type=click.Choice(sorted(KNOWN_MODELS)), default=None,
              help="Built-in model the trace is for; its experts and top-k must match the log. "
                   "Default: the model that produced the log.")
@click.option("--prompt-tokens", type=click.IntRange(min=0), default=None,
              help="Mark the first N positions of each sequence as prefill and the rest as decode "
                   "(default: the importer's own split; esft: every position is prefill).")
def import_(fmt: str, sources: tuple[Path, ...], out: Path, model_spec: str | None,
            prompt_tokens: int | None) -> None:
    """Import public routing logs SRC... of FORMAT into one trace.

    \b
    esft           folders of deepseek-ai/ESFT expert_weights_<layer>.txt (DeepSeek-V2-Lite)
    vllm-jsonl     single-layer vLLM logs of one workload, one file per layer (Qwen1.5-MoE-A2.7B)
    mixtral-jsonl  Mario928 *_routing.jsonl / routing_raw.jsonl files (Mixtral-8x7B)
    """
    from traces.format import write_trace
    from traces.paths import check_output

    check_output(out, inputs=[s for s in sources if s.is_file()], what="--out")
    t = import_trace(fmt, list(sources), model_spec=model_spec, prompt_tokens=prompt_tokens)
    write_trace(t, out)
    click.echo(_done(out, t))


@trace.command("record")
@click.option("--model", required=True, help="Model to run: a built-in mini model name or a HF model folder.")
@click.option("--prompts", "prompts_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Prompt file (JSON lines).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Trace file to write (.safetensors); written atomically.")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=32, show_default=True,
              help="Tokens to generate per prompt (greedy).")
@click.option("--lookahead", type=click.IntRange(min=0), default=2, show_default=True,
              help="Depth D of the look-ahead logits (gate of layer l+d on the gate input of layer l); 0: none.")
@click.option("--gate-inputs", is_flag=True, help="Also store every router input (large: T x L x H float16).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where to run the model.")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              show_default=True,
              help="Compute dtype. auto: float32 on a CPU, the checkpoint's dtype on CUDA. bfloat16 matmuls are "
                   "several times slower than float32 on CPUs without AVX512-BF16/AMX; on CPUs with it (the 2-core "
                   "AMD EPYC dev VM: one Qwen1.5-MoE expert at 64 tokens 7.9 ms bf16 vs 19.2 ms fp32) --dtype "
                   "bfloat16 is faster.")
@click.option("--memory-budget", default=None, metavar="SIZE",
              help="Record a model larger than memory: run it offloaded as `fatesim realrun` does (skeleton without "
                   "weights, routed experts streamed from the checkpoint and loaded on demand) within this "
                   "fast-memory budget (6GiB, 25%). Without it every weight is loaded into memory.")
def record(model: str, prompts_path: Path, out: Path, max_new_tokens: int, lookahead: int, gate_inputs: bool,
           device: str, dtype: str, memory_budget: str | None) -> None:
    """Run a Hugging Face MoE model over prompts and record its routing as a trace.

    Prompts are JSON lines with "text" (or plain text lines), or {"token_ids": [...]} lines for a model
    folder without a tokenizer."""
    from traces.recorder import record_trace  # imports torch and transformers: only when recording

    t = record_trace(model, prompts_path, out, max_new_tokens=max_new_tokens, lookahead=lookahead,
                     gate_inputs=gate_inputs, device=device, dtype=dtype, memory_budget=memory_budget)
    click.echo(_done(out, t))
