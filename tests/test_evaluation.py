"""Evaluation: exact BPB accounting, window plans, sliding evaluation, score-first TTT (legality, lr-0
equivalence, the time budget), 1 vs 2 processes (see test_training's twin runs)."""
import math
import re
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt
from conftest import randomize, run_script, tiny_env


def stream(n: int, seed: int = 0) -> np.ndarray:
    """n tokens: BOS-led documents of random bytes."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 260, size=n).astype(np.uint16)
    tokens[rng.choice(n, size=n // 50)] = train_gpt.BOS_ID
    tokens[0] = train_gpt.BOS_ID
    return tokens


@pytest.mark.parametrize("n,window,stride,chunk", [
    (64, 64, 16, 0), (65, 64, 63, 0), (1000, 64, 63, 0), (1000, 64, 16, 0), (1000, 64, 16, 256),
    (1001, 64, 24, 128), (777, 32, 8, 64), (300, 64, 56, 0), (2049, 2048, 256, 32768)])
def test_window_plan_scores_every_target_once_with_the_most_context(n, window, stride, chunk):
    spans = train_gpt.plan_windows(n, window, stride, chunk)
    counts = np.zeros(n, dtype=int)
    for start, lo, hi in spans:
        assert 0 <= start and start + window <= n and start < lo < hi <= start + window
        counts[lo:hi] += 1
        if chunk:
            assert lo // chunk == (hi - 1) // chunk, "a scored range crosses a chunk boundary"
        # the window ends at its last target (most left context) unless it is pinned at the stream start
        assert start + window == hi or start == 0
    assert counts[0] == 0 and (counts[1:] == 1).all()
    assert spans[0] == (0, 1, min(window, chunk or window))


def test_window_plan_rejects_a_stream_shorter_than_a_window():
    with pytest.raises(ValueError):
        train_gpt.plan_windows(63, 64, 16)


def test_uniform_logits_give_the_closed_form_bpb(tiny_args, cpu_runtime):
    args = tiny_args()
    tokens = stream(1000)
    spans = train_gpt.plan_windows(len(tokens), args.window, args.val_sliding_stride)
    totals = train_gpt.score_spans(lambda ids: torch.zeros(*ids.shape, 260), tokens, spans, args.window, 3,
                                   cpu_runtime)
    targets = tokens[1:]
    byte_targets = int((targets >= 4).sum())
    assert totals.targets == 999 and int(totals.values[2]) == byte_targets
    assert totals.loss == pytest.approx(math.log(260), rel=1e-12)
    assert totals.bpb == pytest.approx(999 * math.log(260) / math.log(2) / byte_targets, rel=1e-12)


def direct_sliding_nll(model, tokens: np.ndarray, window: int, stride: int) -> tuple[float, int]:
    """Each target t scored alone, in the window the stride rule gives it: the window ends at the end of t's
    scored range; the first range is 1..window-1, later ranges are `stride` long."""
    total, nbytes = 0.0, 0
    for t in range(1, len(tokens)):
        hi = window if t < window else min(window + ((t - window) // stride + 1) * stride, len(tokens))
        start = max(0, hi - window)
        ids = torch.from_numpy(tokens[start:start + window].astype(np.int64))[None]
        with torch.no_grad():
            logits = model.forward_logits(ids)[0, t - start]
        total += F.cross_entropy(logits[None].double(), ids[0, t - start:t - start + 1]).item()
        nbytes += int(tokens[t] >= 4)
    return total, nbytes


def test_sliding_evaluation_equals_a_direct_per_target_computation(tiny_args, cpu_runtime):
    args = tiny_args(VAL_SLIDING_STRIDE=24, TTT_CHUNK_TOKENS=64 * 100)
    model = randomize(train_gpt.build_model(args)).eval()
    tokens = stream(203, seed=3)
    totals, _ = train_gpt.evaluate_score_first(model, tokens, args, cpu_runtime, lambda m: None, False, 0.0)
    expected, nbytes = direct_sliding_nll(model, tokens, args.window, 24)
    assert totals.targets == 202 and int(totals.values[2]) == nbytes
    assert totals.values[0].item() == pytest.approx(expected, rel=1e-5)


def test_standard_evaluation_scores_the_tail_too(tiny_args, cpu_runtime):
    args = tiny_args()
    model = randomize(train_gpt.build_model(args)).eval()
    tokens = stream(64 * 3 + 10)
    totals = train_gpt.evaluate_standard(model, tokens, args, cpu_runtime)
    assert totals.targets == len(tokens) - 1
    expected, _ = direct_sliding_nll(model, tokens, args.window, args.window - 1)
    assert totals.values[0].item() == pytest.approx(expected, rel=1e-5)


def score_first(args, rt, tokens, adapt=True, seed=0, log=None):
    model = randomize(train_gpt.build_model(args), seed).eval()
    return train_gpt.evaluate_score_first(model, tokens, args, rt, log or (lambda m: None), adapt,
                                          eval_t0=time.perf_counter())


@pytest.mark.parametrize("knob", [dict(TTT_LR=0), dict(TTT_EPOCHS=0)])
def test_ttt_that_learns_nothing_equals_sliding_evaluation_exactly(tiny_args, cpu_runtime, knob):
    tokens = stream(1100, seed=1)
    sliding, sliding_chunks = score_first(tiny_args(), cpu_runtime, tokens, adapt=False)
    ttt, ttt_chunks = score_first(tiny_args(**knob), cpu_runtime, tokens, adapt=True)
    assert torch.equal(ttt.values, sliding.values)
    assert all(torch.equal(a.values, b.values) for a, b in zip(ttt_chunks, sliding_chunks))


def test_ttt_adapts_after_scoring_the_first_chunk(tiny_args, cpu_runtime):
    tokens = stream(1100, seed=1)
    sliding, sliding_chunks = score_first(tiny_args(), cpu_runtime, tokens, adapt=False)
    ttt, ttt_chunks = score_first(tiny_args(TTT_LR=0.05), cpu_runtime, tokens, adapt=True)
    assert len(ttt_chunks) == math.ceil(1100 / 256)
    assert torch.equal(ttt_chunks[0].values, sliding_chunks[0].values), "chunk 0 is scored before any update"
    assert not torch.equal(ttt_chunks[1].values, sliding_chunks[1].values), "adaptation changed nothing"
    assert ttt.targets == sliding.targets == 1099


@pytest.mark.parametrize("k", [0, 2])
def test_ttt_scores_never_see_later_chunks(tiny_args, cpu_runtime, k):
    """Legality: changing the validation bytes of chunk k+1 and later leaves every score of chunks <= k
    bit-identical, with adaptation on."""
    args = tiny_args(TTT_LR=0.05, TTT_EPOCHS=2)
    a = stream(1200, seed=4)
    b = a.copy()
    b[(k + 1) * 256:] = stream(1200 - (k + 1) * 256, seed=5)
    _, chunks_a = score_first(args, cpu_runtime, a)
    _, chunks_b = score_first(args, cpu_runtime, b)
    for c in range(k + 1):
        assert torch.equal(chunks_a[c].values, chunks_b[c].values), f"chunk {c} saw the future"
    assert not torch.equal(chunks_a[k + 1].values, chunks_b[k + 1].values)


def test_time_budget_stops_adaptation_but_scores_everything(tiny_args, cpu_runtime):
    tokens = stream(1100, seed=1)
    lines = []
    sliding, _ = score_first(tiny_args(), cpu_runtime, tokens, adapt=False)
    ttt, _ = score_first(tiny_args(TTT_LR=0.05, EVAL_MAX_SECONDS=0), cpu_runtime, tokens, log=lines.append)
    stops = [line for line in lines if line.startswith("ttt_budget_stop:")]
    assert len(stops) == 1 and "before chunk 1/5" in stops[0]
    assert ttt.targets == 1099
    assert torch.equal(ttt.values, sliding.values), "no chunk may be adapted on past the budget"
    assert any(line.startswith("ttt_targets_scored:1099 expected:1099 ok") for line in lines)


def test_time_budget_lets_adaptation_run_while_it_fits(tiny_args, cpu_runtime):
    lines = []
    score_first(tiny_args(TTT_LR=0.05, EVAL_MAX_SECONDS=3600), cpu_runtime, stream(1100, seed=1), log=lines.append)
    assert not [line for line in lines if "budget_stop" in line]
    assert "adapted_chunks:4" in [line for line in lines if line.startswith("ttt_chunk:5/5")][0]


def test_ttt_leaves_frozen_blocks_and_the_projector_alone(tiny_args):
    args = tiny_args(TTT_FREEZE_BLOCKS=1)
    model = train_gpt.build_model(args)
    chosen = {id(p) for p in train_gpt.ttt_parameters(model, args)}
    assert not any(id(p) in chosen for p in model.blocks[0].parameters())
    assert all(id(p) in chosen for p in model.blocks[1].parameters())
    assert not any(id(p) in chosen for p in model.projector.parameters())
    assert id(model.head.weight) in chosen


def test_end_to_end_eval_lines_and_budget_stop(corpus, tmp_path):
    """The final lines reviewers parse, from a real run, with a budget too small for any adaptation."""
    run = run_script(tmp_path, tiny_env(corpus, ITERATIONS=4, SLIDING_EVAL=1, EVAL_MAX_SECONDS=0), run_id="ev")
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    for label in ("final_int6_lzma_roundtrip", "final_sliding", "final_ttt"):
        assert len(run.lines(f"{label} val_loss:")) == 1 and "eval_time:" in run.lines(f"{label} val_loss:")[0]
        exact = run.lines(f"{label}_exact val_loss:")[0]
        assert re.fullmatch(rf"{label}_exact val_loss:\d+\.\d{{8}} val_bpb:\d+\.\d{{8}}", exact), exact
    assert run.lines("ttt_budget_stop:")
    assert run.value("final_ttt_exact", "val_bpb") == run.value("final_sliding_exact", "val_bpb")
    assert run.lines("eval_total_time:") and "projected_8gpu:" in run.lines("eval_total_time:")[0]
    scored = run.lines("ttt_targets_scored:")[0]
    assert scored.endswith(" ok")
