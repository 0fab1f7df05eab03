"""The one compiled part of fatesim: the simulator's replay kernel (sim/kernel/compiled.c), a CPython
extension built by `pip install -e .` (`make install`) with the machine's C compiler.

Everything else is in pyproject.toml. The kernel is built without fast-math and without FMA contraction:
its results must equal the reference engine's bit for bit. The source's SHA-256 is compiled in, so that
sim/kernel/__init__.py can tell a module built from an older source (then it says how to rebuild). Without
a C compiler the build is skipped (optional) and replays run in the reference engine, saying so.
"""

import hashlib
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "sim/kernel/compiled.c"
digest = hashlib.sha256(Path(__file__).with_name("sim").joinpath("kernel", "compiled.c").read_bytes()).hexdigest()

setup(ext_modules=[Extension(
    "sim.kernel._compiled", [SOURCE],
    define_macros=[("SOURCE_SHA256", f'"{digest}"')],
    extra_compile_args=["-O2", "-std=c11", "-fno-fast-math", "-ffp-contract=off", "-Wall", "-Wextra",
                        "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
    optional=True,
)])
