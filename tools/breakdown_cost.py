"""What the per-byte breakdown costs the evaluation, on the model and device the environment configures.

    OMP_NUM_THREADS=1 DEVICE=cpu <model knobs> python3 tools/breakdown_cost.py [--tokens N] [--repeats R]

Builds the configured model (random weights: the time does not depend on them), takes the first N validation tokens
of DATA_PATH, and runs the standard and the sliding evaluation (TTT's scoring) R times each with EVAL_BREAKDOWN on
and off, alternating. It prints, per evaluation, the fastest time of each and their difference, and, timed around
them inside the runs with the breakdown on, the share of the time spent building the breakdown (Breakdown()) and
adding to it (Breakdown.add). On a CPU shared with other work the on/off difference drowns in noise and the share is
the measure; on CUDA the additions run asynchronously, so the share only counts their launches and the on/off
difference is the measure.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402


class Stopwatch:
    """Seconds spent inside Breakdown() and Breakdown.add while it is installed."""

    def __init__(self):
        self.seconds = 0.0
        self.originals = (train_gpt.Breakdown.__init__, train_gpt.Breakdown.add)

    def timed(self, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            fn(*args, **kwargs)
            self.seconds += time.perf_counter() - t
        return wrapper

    def __enter__(self):
        train_gpt.Breakdown.__init__, train_gpt.Breakdown.add = map(self.timed, self.originals)
        return self

    def __exit__(self, *exc):
        train_gpt.Breakdown.__init__, train_gpt.Breakdown.add = self.originals


def evaluations(model, tokens: np.ndarray, rt: train_gpt.Runtime) -> dict:
    """name -> function of the knobs running that evaluation on `tokens`, compiled as in a run (on CUDA)."""
    return {
        "standard": lambda args: train_gpt.evaluate_standard(model, tokens, args, rt,
                                                             train_gpt.logits_function(model, rt)),
        "sliding": lambda args: train_gpt.evaluate_score_first(model, tokens, args, rt, lambda m: None, False,
                                                               time.perf_counter()),
    }


def measure(tokens: int, repeats: int) -> list[str]:
    """One line per evaluation: the fastest time with and without the breakdown (the first runs compile), and the
    share of the time with it spent inside it, over all runs."""
    on, off = train_gpt.Hyperparameters(), train_gpt.Hyperparameters()
    on.eval_breakdown, off.eval_breakdown = True, False
    rt = train_gpt.Runtime(on)
    model = train_gpt.build_model(on).to(rt.device).eval()
    val = train_gpt.load_validation_tokens(on)[:tokens]
    lines = [f"breakdown_cost: device {rt.device} threads {os.environ.get('OMP_NUM_THREADS', 'default')} "
             f"window {on.window} targets {len(val) - 1} repeats {repeats}"]
    for name, run in evaluations(model, val, rt).items():
        times, inside = {"on": [], "off": []}, 0.0
        for _ in range(repeats):
            for key, args in (("on", on), ("off", off)):
                with Stopwatch() as watch:
                    t = rt.now()
                    run(args)
                    times[key].append(rt.now() - t)
                inside += watch.seconds
        fast_on, fast_off = min(times["on"]), min(times["off"])
        lines.append(f"breakdown_cost {name}: on {fast_on:.3f}s off {fast_off:.3f}s difference "
                     f"{100 * (fast_on - fast_off) / fast_off:+.2f}% inside {100 * inside / sum(times['on']):.3f}%")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=65_409, help="validation tokens to score (default 65,409)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each evaluation, on and off (default 3)")
    a = p.parse_args(argv)
    try:
        args = train_gpt.Hyperparameters()
        train_gpt.check_device(args)
        train_gpt.check_inputs(args)
        for line in measure(a.tokens, a.repeats):
            print(line, flush=True)
    except train_gpt.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
