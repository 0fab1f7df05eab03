"""Miss handling: what a layer does about a routed expert that is neither resident nor in flight.

- `wait`: load it on demand and compute it when its bytes arrive (every offloading system's default).
- `cpu`: compute it on the CPU from host memory instead of moving it (Fiddler, arXiv 2402.07033;
  llama.cpp `--n-cpu-moe`); nothing is loaded, the GPU and CPU work on the layer in parallel.
- `speculated`: execute a speculated expert instead (Speculating Experts, arXiv 2603.19289): an expert of
  this layer that was prefetched for this step, is resident and was not routed replaces the missing one
  (lossy; the accuracy cost is measured by `fatesim accuracy`); with none left, wait.
- `lowbit`: load a low-bit copy (`miss_precision`, default int2) on demand (HOBBIT, arXiv 2411.01433):
  fewer bytes on the critical path, lower accuracy for that use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

MISSES = ("wait", "cpu", "speculated", "lowbit")
"""Valid miss policy names."""


class MissPlan(NamedTuple):
    """How one layer step's misses are served."""

    load: list[int]
    """Misses to load on demand."""
    cpu: list[int]
    """Misses computed on the CPU."""
    substitutions: list[tuple[int, int]]
    """(routed expert, speculated expert computed in its place)."""


@dataclass(frozen=True)
class MissPolicy:
    name: str
    miss_precision: str
    """Precision of on-demand loads under `lowbit`."""

    def resolve(self, misses: list[int], spare_speculated: list[int]) -> MissPlan:
        """Split `misses` into loads, CPU work and substitutions by spare speculated experts."""
        if self.name == "cpu":
            return MissPlan([], list(misses), [])
        if self.name == "speculated":
            n = min(len(misses), len(spare_speculated))
            subs = list(zip(misses[:n], spare_speculated[:n], strict=True))
            return MissPlan(list(misses[n:]), [], subs)
        return MissPlan(list(misses), [], [])

    def loads_on_miss(self) -> bool:
        """Whether misses may ever be loaded (cpu never loads)."""
        return self.name != "cpu"
