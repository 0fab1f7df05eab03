"""sim.background.Background and the work the simulator hands to it (the hash, the chunked look-ahead softmax):
the same results as computed in the caller's thread, all at once."""

from __future__ import annotations

import numpy as np
import pytest

from sim.background import Background
from sim.synthetic import synthetic_trace
from sim.workload import build_workload


def test_the_result_and_the_error_reach_the_caller() -> None:
    assert Background(lambda: 6 * 7, "test").result() == 42

    def fails() -> int:
        raise ValueError("boom")

    pending = Background(fails, "test")
    with pytest.raises(ValueError, match="boom"):
        pending.result()


def test_a_process_forked_while_it_ran_computes_it_itself() -> None:
    import os
    import threading

    release, parent = threading.Event(), os.getpid()

    def slow() -> int:
        if os.getpid() == parent:  # the parent's thread holds on until the child is done
            release.wait(10)
        return 7

    pending = Background(slow, "test")
    pid = os.fork()
    if pid == 0:  # the child: the thread did not come along
        os._exit(0 if pending.result() == 7 else 1)
    release.set()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert pending.result() == 7


def test_the_softmax_in_background_gives_the_same_bits() -> None:
    trace = synthetic_trace(sequences=2, prompt_tokens=12, decode_tokens=9, seed=4, lookahead_depth=2)
    here, there = build_workload(trace), build_workload(trace, softmax_in_background=True)
    assert there.lookahead_probs.dtype == np.float32
    assert np.array_equal(here.lookahead_probs.view(np.uint32), there.lookahead_probs.view(np.uint32))
    assert there.lookahead_probs is there.lookahead_probs  # computed once


def test_the_chunked_softmax_is_the_whole_array_softmax_bit_for_bit() -> None:
    """sim.policies.requirements.lookahead_probabilities runs a few rows at a time; each row's operations are
    those of the softmax over the whole array at once, so the bits are too (rows that underflow and tie
    included)."""
    from sim.policies.requirements import lookahead_probabilities

    rng = np.random.default_rng(5)
    logits = rng.choice(np.array([-60000, -40, -1, 0, 0.5, 3, 40, 60000], np.float16), size=(2, 37, 3, 7))
    logits[0, :5] = rng.standard_normal((5, 3, 7)).astype(np.float16) * 8
    whole = logits.astype(np.float32)
    whole -= whole.max(axis=-1, keepdims=True)
    np.exp(whole, out=whole)
    whole /= whole.sum(axis=-1, keepdims=True)
    for chunk_rows in (1, 5, 64, 1 << 20):
        got = lookahead_probabilities(logits, chunk_rows=chunk_rows)
        assert got.dtype == np.float32 and got.shape == logits.shape
        assert np.array_equal(got.view(np.uint32), whole.view(np.uint32)), chunk_rows
