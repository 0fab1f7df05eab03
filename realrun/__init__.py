"""realrun: the real offloading engine, driven by the simulator's own policy objects.

Read in this order: `engine` (the model surgery and the per-layer plan execution), `loader` (the I/O
thread / copy stream), `store` (slow tiers: O_DIRECT disk file, host RAM), `quant` (HQQ-packed records of
exactly the simulator's sizes), `experts` (the drop-in experts module), `runner` (greedy loop, store
building), `session` (`run_realrun`, behind `fatesim realrun`), `cli`, `bench` (`make bench-real`).
"""
