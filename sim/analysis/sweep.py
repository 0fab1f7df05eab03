"""What-if sweeps: replay one trace under the cartesian product of a grid of configurations.

A grid is a TOML file; every key takes a list (a scalar means a list of one):

```toml
policy = ["lod", "lru", "fate"]            # presets (`fatesim policies`)
budget = ["10%", "25%", "6GiB"]            # fast-memory budgets (sim/budget.py, as replay reads them)
profile = ["rtx3090-bound"]                # hardware profiles (`fatesim profiles`) or .toml paths
link_bandwidth = ["12GB", "25GB"]          # bytes per second (a number, or a size with a unit, read per
                                           # second); overrides the profile's link (omit: the profile's)
as_model = ["none", "qwen1.5-moe-a2.7b"]   # replay with a larger model's shapes ("none": the trace's own)
layers_subset = true                       # a trace of some of its model's MoE layers: replay just those
estimator = ["est.safetensors"]            # learned-predictor weights (`fatesim train-estimator`), for
                                           # policies with prediction=learned ("none": no estimator)
[set]                                      # any `--set key=value` of the policies
int2_rate = [0.3, 0.5]
```

Each configuration gets a hash (sha256 of its JSON with the trace's content hash and a fingerprint of the
simulator's source code, so results of an older simulator are not reused); a finished one is
stored as `<cache>/<hash>.json` at once, so a re-run — or a run after an interruption — computes only what
is new. A configuration that raises is reported (status "error", the one-line reason) and the others go
on. Work runs in local processes (`workers`), or as Ray tasks on a cluster (`ray_address`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib
import itertools
import json
import os
import socket
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from traces.atomic import atomic_output
from traces.errors import UserError

GRID_KEYS = ("policy", "budget", "profile", "link_bandwidth", "as_model", "estimator", "layers_subset", "set")
CACHE_VERSION = 1
"""Bump when the meaning of cached metrics changes: old entries are then ignored."""
DEFAULT_RUNNER = "sim.replay:replay"
"""`replay(trace, policy=, hw=, memory_budget=, as_model=, overrides=) -> metrics dict` (ARCHITECTURE.md)."""

Runner = Callable[..., dict]


@dataclass(frozen=True)
class SweepConfig:
    """One point of a grid."""

    policy: str
    budget: str
    profile: str
    link_bandwidth_bytes_per_s: float | None
    """None: the profile's own link bandwidth."""
    as_model: str | None
    overrides: tuple[tuple[str, Any], ...]
    """Sorted (key, value) pairs for `build_policy(policy, overrides)`."""
    estimator: str | None = None
    """Path of a learned estimator (safetensors) injected as the `learned` predictor's score_fn."""
    layers_subset: bool = False
    """Replay a trace of some of its model's MoE layers as a model of those layers (sim/layersubset.py)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (overrides as a dict)."""
        d = dataclasses.asdict(self)
        d["overrides"] = dict(self.overrides)
        return d

    def config_hash(self, trace_hash: str, estimator_hash: str = "") -> str:
        """sha256 (hex, 16 chars) of this configuration, the trace, the estimator file and CACHE_VERSION."""
        blob = json.dumps({"config": self.to_dict(), "trace": trace_hash, "estimator": estimator_hash,
                           "v": CACHE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class SweepOutcome:
    """What a sweep did: one row per configuration (grid order) and how each row came about."""

    rows: list[dict[str, Any]]
    computed: int
    cached: int
    failed: list[tuple[SweepConfig, str]]


def _as_list(key: str, value: Any) -> list[Any]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise UserError(f"grid key {key!r} has an empty list; give at least one value or drop the key")
    for v in values:
        if not isinstance(v, (str, int, float, bool)):
            raise UserError(f"grid key {key!r} has value {v!r}; values must be strings, numbers or booleans")
    return values


def _bandwidth(value: Any) -> float | None:
    """Bytes per second from a grid value: a number, a size string per second ("12GB"), or "profile"."""
    if isinstance(value, str) and value.strip().lower() in ("profile", "none", ""):
        return None
    from sim.units import parse_size

    bw = float(value) if isinstance(value, (int, float)) else float(parse_size(value.removesuffix("/s")))
    if bw <= 0:
        raise UserError(f"link_bandwidth {value!r} must be more than 0 bytes per second")
    return bw


def parse_grid(text: str, source: str = "<grid>") -> list[SweepConfig]:
    """The configurations of a grid TOML (module docstring), in a stable order; UserError on a bad grid."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"grid {source} is not valid TOML: {error}") from None
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        raise UserError(f"grid {source} has unknown key {unknown[0]!r}; valid keys: {', '.join(GRID_KEYS)}")
    if "policy" not in data:
        raise UserError(f"grid {source} has no 'policy' list; name at least one preset")
    policies = [str(p) for p in _as_list("policy", data["policy"])]
    budgets = [str(b) for b in _as_list("budget", data.get("budget", "25%"))]
    profiles = [str(p) for p in _as_list("profile", data.get("profile", "rtx3090-bound"))]
    bandwidths = [_bandwidth(b) for b in _as_list("link_bandwidth", data.get("link_bandwidth", "profile"))]
    as_models = [None if str(m).lower() in ("none", "") else str(m)
                 for m in _as_list("as_model", data.get("as_model", "none"))]
    estimators = [None if str(e).lower() in ("none", "") else str(e)
                  for e in _as_list("estimator", data.get("estimator", "none"))]
    subsets = _as_list("layers_subset", data.get("layers_subset", False))
    if not all(isinstance(v, bool) for v in subsets):
        raise UserError(f"grid {source}: layers_subset must be true or false")
    sets = data.get("set", {})
    if not isinstance(sets, dict):
        raise UserError(f"grid {source}: 'set' must be a table of policy keys, e.g. [set] int2_rate = [0.3, 0.5]")
    set_keys = sorted(sets)
    set_values = [_as_list(f"set.{key}", sets[key]) for key in set_keys]
    configs = []
    for policy, budget, profile, bw, as_model, estimator, subset, *values in itertools.product(
            policies, budgets, profiles, bandwidths, as_models, estimators, subsets, *set_values):
        overrides = tuple(zip(set_keys, values, strict=True))
        configs.append(SweepConfig(policy, budget, profile, bw, as_model, overrides, estimator, subset))
    return configs


def read_grid(path: str | os.PathLike[str]) -> list[SweepConfig]:
    """`parse_grid` of a file; UserError when it cannot be read."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read grid file {path}: {error.strerror if isinstance(error, OSError) else error}") from None
    return parse_grid(text, str(path))


def check_configs(configs: Iterable[SweepConfig], trace) -> None:
    """Refuse names that can never work (unknown preset, key, profile, model, unreadable budget) before any
    runs. A budget above a profile's device memory is not refused here: that configuration fails with the
    reason and the others run."""
    from sim.budget import resolve_budget
    from sim.hardware import load_profile
    from sim.modelspec import ModelSpec, get_model_spec
    from sim.policies.presets import build_policy

    seen: set[tuple] = set()
    for c in configs:
        key = (c.policy, c.overrides, c.profile, c.as_model, c.budget)
        if key in seen:
            continue
        seen.add(key)
        build_policy(c.policy, {k: str(v) if isinstance(v, (int, float, bool)) else v for k, v in c.overrides})
        load_profile(c.profile)
        spec = get_model_spec(c.as_model) if c.as_model else ModelSpec.from_trace(trace)
        resolve_budget(c.budget, spec, kv_tokens=0, option="grid key 'budget'")
        if c.estimator is not None and not Path(c.estimator).is_file():
            raise UserError(f"estimator file {c.estimator} does not exist; train one with `fatesim train-estimator`")


def _resolve_runner(runner: Runner | str) -> Runner:
    if callable(runner):
        return runner
    module, _, attribute = runner.partition(":")
    return getattr(importlib.import_module(module), attribute)


_TRACES: dict[tuple[str, bool], Any] = {}
"""Per-process cache of read traces, so a worker reads (memory-maps) and prepares its trace once."""


def _load_trace(path: str, prepared: bool):
    """The trace at `path`; `prepared`: as `sim.replay.load` makes it (steps, hash) for the default runner."""
    key = (path, prepared)
    if key not in _TRACES:
        from traces.format import read_trace

        trace = read_trace(path)
        if prepared:
            from sim.replay import load

            trace = load(trace)
        _TRACES[key] = trace
    return _TRACES[key]


def run_config(trace_path: str, config: SweepConfig, runner: Runner | str = DEFAULT_RUNNER) -> dict[str, Any]:
    """Replay one configuration; never raises: {"status": "ok", "metrics", "elapsed_s"} or
    {"status": "error", "error": "Type: message", "elapsed_s"}."""
    started = time.perf_counter()
    try:
        prepared = runner == DEFAULT_RUNNER
        trace = _load_trace(trace_path, prepared)
        hw: Any = config.profile
        if config.link_bandwidth_bytes_per_s is not None:
            from sim.hardware import load_profile

            hw = load_profile(config.profile).with_link_bandwidth(config.link_bandwidth_bytes_per_s)
        overrides = {k: str(v).lower() if isinstance(v, bool) else v for k, v in config.overrides}
        extra: dict[str, Any] = {}
        if config.estimator is not None:
            from sim.analysis.estimator import load_estimator, make_score_fn

            raw = trace.trace if prepared else trace
            extra["score_fn"] = make_score_fn(load_estimator(config.estimator), raw)
        if prepared:
            extra["budget_option"] = "grid key 'budget'"
        if config.layers_subset:
            extra["layers_subset"] = True
        metrics = _resolve_runner(runner)(trace, policy=config.policy, hw=hw, memory_budget=config.budget,
                                          as_model=config.as_model, overrides=overrides, **extra)
        return {"status": "ok", "metrics": metrics, "elapsed_s": time.perf_counter() - started}
    except Exception as error:  # isolation: one failing configuration must not lose the others
        message = " ".join(str(error).split()) or "(no message)"
        return {"status": "error", "error": f"{type(error).__name__}: {message}",
                "elapsed_s": time.perf_counter() - started}


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """One flat row: scalars as they are, `bytes_transferred` as bytes_<kind>, other nested values as JSON."""
    row: dict[str, Any] = {}
    for key, value in metrics.items():
        if key == "bytes_transferred" and isinstance(value, dict):
            for kind, nbytes in value.items():
                row[f"bytes_{kind}"] = nbytes
        elif value is None or isinstance(value, (str, int, float, bool)):
            row[key] = value
        else:
            row[key] = json.dumps(value, sort_keys=True)
    return row


def _config_columns(config: SweepConfig, config_hash: str) -> dict[str, Any]:
    row = {"config_hash": config_hash, "policy": config.policy, "budget": config.budget,
           "profile": config.profile, "link_bandwidth_bytes_per_s": config.link_bandwidth_bytes_per_s,
           "as_model": config.as_model or "", "estimator": config.estimator or "",
           "layers_subset": config.layers_subset}
    for key, value in config.overrides:
        row[f"set.{key}"] = value
    return row


def _check_ray_address(address: str) -> None:
    """Fail fast, in one line, when a host:port Ray address does not answer (ray.init would hang)."""
    if address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"Ray address {address!r} is not host:port, ray://host:port, 'auto' or 'local'")
    try:
        socket.create_connection((host, int(port)), timeout=3.0).close()
    except OSError as error:
        raise UserError(f"cannot reach Ray at {address}: {error.strerror or error}; is the cluster running?") from None


def _ray_run(trace_bytes_ref: Any, trace_hash: str, config: SweepConfig, runner: Runner | str) -> dict:
    """Ray task body: materialise the trace from the object store once per worker node, then replay."""
    import ray

    path = Path(tempfile.gettempdir()) / f"fatesim-trace-{trace_hash[:16]}.safetensors"
    if not path.exists():
        data = ray.get(trace_bytes_ref) if isinstance(trace_bytes_ref, ray.ObjectRef) else trace_bytes_ref
        with atomic_output(path) as tmp:
            tmp.write_bytes(data)
    return run_config(str(path), config, runner)


def _execute(todo: list[tuple[int, SweepConfig]], trace_path: str, trace_hash: str, runner: Runner | str,
             workers: int, ray_address: str | None, progress: bool,
             on_done: Callable[[int, dict], None]) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="sweep", unit="config", dynamic_ncols=True,
               disable=True if not progress or not todo else None)  # None: silent when stderr is no terminal
    try:
        if ray_address is not None:
            _check_ray_address(ray_address)
            import ray

            if not ray.is_initialized():
                try:
                    if ray_address == "local":
                        ray.init(include_dashboard=False, log_to_driver=False)
                    else:
                        ray.init(address=ray_address, log_to_driver=False)
                except (ConnectionError, RuntimeError, ValueError) as error:
                    raise UserError(f"cannot connect to Ray at {ray_address}: {' '.join(str(error).split())}") from None
            task = ray.remote(num_cpus=1, max_retries=0)(_ray_run)
            trace_ref = ray.put(Path(trace_path).read_bytes())
            pending = {task.remote(trace_ref, trace_hash, config, runner): index for index, config in todo}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    index = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as error:  # a worker that died: report, keep the rest
                        result = {"status": "error", "error": f"{type(error).__name__}: ray task failed",
                                  "elapsed_s": 0.0}
                    on_done(index, result)
                    bar.update(1)
        elif workers <= 1:
            for index, config in todo:
                on_done(index, run_config(trace_path, config, runner))
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(run_config, trace_path, config, runner): index for index, config in todo}
                for future in as_completed(futures):
                    try:
                        result = future.result()
                    except Exception as error:  # e.g. a worker killed by the OOM killer
                        result = {"status": "error", "error": f"{type(error).__name__}: worker process failed",
                                  "elapsed_s": 0.0}
                    on_done(futures[future], result)
                    bar.update(1)
    finally:
        bar.close()


def code_fingerprint() -> str:
    """sha256 (16 hex chars) of the simulator's source (sim/ and sim/policies/ .py files, shipped profiles,
    traces/format.py; not sim/analysis/): a cached result is reused only by the code that computed it."""
    root = Path(__file__).resolve().parents[2]
    files = sorted(p for p in (root / "sim").rglob("*") if p.is_file() and p.suffix in (".py", ".toml")
                   and "analysis" not in p.relative_to(root / "sim").parts and "__pycache__" not in p.parts)
    files.append(root / "traces" / "format.py")
    h = hashlib.sha256()
    for path in files:
        if path.is_file():
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    except OSError as error:
        raise UserError(f"cannot read estimator file {path}: {error.strerror}") from None
    return h.hexdigest()


def run_sweep(trace_path: str | os.PathLike[str], configs: list[SweepConfig], cache_dir: str | os.PathLike[str],
              runner: Runner | str = DEFAULT_RUNNER, workers: int = 1, ray_address: str | None = None,
              progress: bool = True, check: bool = True) -> SweepOutcome:
    """Run every configuration not already in `cache_dir`; return all rows in grid order.

    `check` validates names and budgets up front (`check_configs`); a runtime failure of one
    configuration is recorded in its row (status "error") and left out of the cache, so a re-run retries it.
    """
    from traces.format import read_trace

    trace_path = str(trace_path)
    if not Path(trace_path).is_file():
        raise UserError(f"trace file {trace_path} does not exist")
    trace = read_trace(trace_path)
    if check:
        check_configs(configs, trace)
    trace_hash = trace.content_hash()
    cache = Path(cache_dir)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create sweep cache folder {cache}: {error.strerror}") from None
    estimator_hashes = {c.estimator: _file_sha256(c.estimator) for c in configs if c.estimator is not None}
    code = code_fingerprint() if runner == DEFAULT_RUNNER else "custom-runner"
    hashes = [c.config_hash(trace_hash + code, estimator_hashes.get(c.estimator, "")) for c in configs]
    results: dict[int, dict] = {}
    todo: list[tuple[int, SweepConfig]] = []
    for index, (config, h) in enumerate(zip(configs, hashes, strict=True)):
        entry = cache / f"{h}.json"
        if entry.is_file():
            try:
                results[index] = {**json.loads(entry.read_text()), "cached": True}
                continue
            except (json.JSONDecodeError, OSError):
                pass  # a damaged entry is recomputed
        todo.append((index, config))
    # several grid points may share one hash (duplicates in the grid): compute each once
    first: dict[str, int] = {}
    unique = []
    for index, config in todo:
        if hashes[index] not in first:
            first[hashes[index]] = index
            unique.append((index, config))

    def on_done(index: int, result: dict) -> None:
        results[index] = result
        if result["status"] == "ok":
            with atomic_output(cache / f"{hashes[index]}.json") as tmp:
                tmp.write_text(json.dumps({"status": "ok", "metrics": result["metrics"],
                                           "elapsed_s": result["elapsed_s"], "config": configs[index].to_dict()},
                                          sort_keys=True))

    _execute(unique, trace_path, trace_hash, runner, workers, ray_address, progress, on_done)
    rows, failed = [], []
    for index, config in enumerate(configs):
        result = results.get(index) or results[first[hashes[index]]]
        row = _config_columns(config, hashes[index])
        row["status"] = result["status"]
        row["error"] = result.get("error", "")
        row["elapsed_s"] = result.get("elapsed_s")
        if result["status"] == "ok":
            for key, value in flatten_metrics(result["metrics"]).items():
                row.setdefault(key, value)  # the configuration's own columns (policy, profile, ...) win
        else:
            failed.append((config, result["error"]))
        rows.append(row)
    cached = sum(1 for r in results.values() if r.get("cached"))
    return SweepOutcome(rows=rows, computed=len(unique), cached=cached, failed=failed)


def write_results(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write rows as CSV or Parquet (by extension), atomically; columns in first-seen order."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise UserError(f"results file {path} must end in .csv or .parquet")
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with atomic_output(path) as tmp:
        if suffix == ".csv":
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                for row in rows:
                    writer.writerow({key: ("" if row.get(key) is None else row.get(key)) for key in columns})
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows])
            pq.write_table(table, tmp)


def read_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a results file written by `write_results` (CSV values parsed back to numbers)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"results file {path} does not exist; run `fatesim sweep` first")
    if p.suffix.lower() not in (".csv", ".parquet"):
        raise UserError(f"results file {path} must end in .csv or .parquet")
    not_results = f"results file {path} is not a {p.suffix.lower()[1:]} table written by `fatesim sweep`"
    if p.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(p).to_pylist()
        except (pa.ArrowException, OSError) as error:
            raise UserError(f"{not_results} ({' '.join(str(error).split())[:120]})") from None
    else:
        def parse(value: str) -> Any:
            if value == "":
                return None
            try:
                number = float(value)
            except ValueError:
                return value
            return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number

        try:
            with open(p, newline="", encoding="utf-8") as handle:
                rows = [{key: parse(value) for key, value in row.items()} for row in csv.DictReader(handle)]
        except (UnicodeDecodeError, csv.Error) as error:
            raise UserError(f"{not_results} ({error.__class__.__name__}: {' '.join(str(error).split())[:120]})") from None
    if rows and not {"policy", "status"} <= set(rows[0]):
        raise UserError(f"{not_results} (no 'policy' and 'status' columns)")
    return rows


def sweep(trace: str, grid: str, out: str, workers: int = 1, ray_address: str | None = None,
          cache_dir: str | None = None, progress: bool = True, runner: Runner | str = DEFAULT_RUNNER) -> SweepOutcome:
    """`fatesim sweep`: read the grid, run what is new, write the results file."""
    from traces.paths import check_output

    check_output(out, inputs=[trace, grid], suffixes=(".csv", ".parquet"), what="--out")
    folder = Path(out).parent if str(Path(out).parent) else Path(".")
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    configs = read_grid(grid)
    cache = cache_dir if cache_dir is not None else str(folder / ".sweep-cache")
    outcome = run_sweep(trace, configs, cache, runner=runner, workers=workers, ray_address=ray_address,
                        progress=progress)
    write_results(outcome.rows, out)
    return outcome
