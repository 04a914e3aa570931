"""Evaluation: exact BPB accounting, window plans, sliding evaluation, score-first TTT (legality, lr-0
equivalence, the time budget, a non-finite loss), 1 vs 2 processes (see test_training's twin runs), a stop signal."""
import json
import math
import os
import re
import signal
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt
from conftest import (ROOT, WORD_PATCHES, VirtualClock, assert_breakdown_adds_up, leftovers, logged_breakdown,
                      one_error_line, randomize, run_script, signal_run, tiny_env)


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
                                   cpu_runtime, train_gpt.Breakdown(tokens, args, cpu_runtime.device))
    targets = tokens[1:]
    byte_targets = int((targets >= 4).sum())
    assert totals.targets == 999 and int(totals.values[2]) == byte_targets
    assert totals.loss == pytest.approx(math.log(260), rel=1e-12)
    assert totals.bpb == pytest.approx(999 * math.log(260) / math.log(2) / byte_targets, rel=1e-12)


def uniform_breakdown(tokens: np.ndarray, args, rt, stride: int) -> dict[str, tuple[float, int, int]]:
    """Bucket -> (nats, targets, bytes) of uniform logits over windows of the given stride."""
    spans = train_gpt.plan_windows(len(tokens), args.window, stride)
    totals = train_gpt.score_spans(lambda ids: torch.zeros(*ids.shape, 260), tokens, spans, args.window, 2, rt,
                                   train_gpt.Breakdown(tokens, args, rt.device))
    assert totals.targets == len(tokens) - 1
    rows = {name: (nats, int(n), int(b)) for name, (nats, n, b) in zip(totals.labels, totals.breakdown.tolist())}
    for nats, n, _ in rows.values():
        assert nats == pytest.approx(n * math.log(260), rel=1e-12)
    return rows


def counts(rows: dict, grouping: str, column: int = 1) -> dict[str, int]:
    """The grouping's non-empty buckets: bucket -> targets (column 1) or bytes (column 2)."""
    return {k.split(":", 1)[1]: v[column] for k, v in rows.items() if k.startswith(grouping + ":") and v[1]}


def test_breakdown_of_a_hand_made_stream(tiny_args, cpu_runtime):
    """Ten documents of BOS + "aB3 ,\u00e9\n" (8 bytes: one of each class, two of whitespace, the two bytes of
    U+00E9): 89 targets; windows of 64 (patches of 4) at stride 63 are (0, 1..63) and (26, 64..89)."""
    args = tiny_args()
    tokens = np.concatenate([train_gpt.encode_document("aB3 ,\u00e9\n") for _ in range(10)])
    rows = uniform_breakdown(tokens, args, cpu_runtime, stride=63)
    assert counts(rows, "class") == dict(lower=10, upper=10, digit=10, space=20, punct=10, utf8_lead=10,
                                         utf8_cont=10, bos=9)
    assert counts(rows, "class", 2) == dict(lower=10, upper=10, digit=10, space=20, punct=10, utf8_lead=10,
                                            utf8_cont=10, bos=0)
    assert counts(rows, "doc_pos") == {"0": 9, "1": 10, "2-3": 20, "4-7": 40, "8-15": 10}
    # window 1 scores indices 1..63, window 2 indices 38..63 (targets 64..89)
    assert counts(rows, "slot") == {"0": 15 + 6, "1": 16 + 6, "2": 16 + 7, "3": 16 + 7}
    assert counts(rows, "context") == {"1": 1, "2-3": 2, "4-7": 4, "8-15": 8, "16-31": 16, "32-63": 32 + 26}
    bos = np.flatnonzero(tokens == train_gpt.BOS_ID)[1:]  # BOS targets: target t sits at index t - start
    index = np.where(bos < 64, bos, bos - 26)
    assert counts(rows, "slot", 2) == {str(k): counts(rows, "slot")[str(k)] - int((index % 4 == k).sum())
                                       for k in range(4)}


def test_document_position_counts_from_the_last_bos_in_the_stream(tiny_args, cpu_runtime):
    """A document longer than the window (sliding windows at stride 16 that hold no BOS) and bytes before the
    stream's first BOS, which count from the stream's start: t = 1..99, BOS at 100, then 1..99 again."""
    args = tiny_args()
    tokens = np.array([ord("a") + 4] * 100 + [train_gpt.BOS_ID] + [ord("b") + 4] * 99, dtype=np.uint16)
    rows = uniform_breakdown(tokens, args, cpu_runtime, stride=16)
    assert counts(rows, "doc_pos") == {"0": 1, "1": 2, "2-3": 4, "4-7": 8, "8-15": 16, "16-31": 32, "32-63": 64,
                                       "64-127": 72}
    assert counts(rows, "class") == dict(lower=198, bos=1)


@pytest.mark.parametrize("adapt", [False, True])
@pytest.mark.parametrize("patching", [{}, WORD_PATCHES], ids=["fixed", "space"])
def test_breakdown_adds_up_to_the_headline_sums(tiny_args, cpu_runtime, adapt, patching):
    """A randomized model, standard evaluation and score-first TTT over 5 chunks: over each grouping the buckets'
    nats, targets and bytes equal the headline's, in the sums and on the logged lines."""
    args = tiny_args(TTT_LR=0.05, EVAL_MAX_SECONDS=1e6, **patching)
    model = randomize(train_gpt.build_model(args)).eval()
    tokens = stream(1100, seed=1)
    totals = (train_gpt.evaluate_score_first(model, tokens, args, cpu_runtime, lambda m: None, True, 0.0)[0]
              if adapt else train_gpt.evaluate_standard(model, tokens, args, cpu_runtime))
    rows = dict(zip(totals.labels, totals.breakdown.numpy()))
    assert_breakdown_adds_up(rows, totals.values.numpy())
    lines = []
    train_gpt.log_final(lines.append, "final_x", totals)
    assert_breakdown_adds_up(*logged_breakdown(lines, "final_x"))


def test_eval_breakdown_off_scores_the_same_and_logs_no_buckets(tiny_args, cpu_runtime):
    model = randomize(train_gpt.build_model(tiny_args())).eval()
    tokens = stream(1100, seed=1)
    on, off = (train_gpt.evaluate_standard(model, tokens, tiny_args(EVAL_BREAKDOWN=knob), cpu_runtime)
               for knob in (1, 0))
    assert torch.equal(on.values, off.values) and on.labels and not off.labels
    lines = []
    train_gpt.log_final(lines.append, "final_x", off)
    assert [line.split()[0] for line in lines] == ["final_x", "final_x_exact", "final_x_sums"]


def test_byte_class_of_every_id():
    """Every one of the 260 ids in its class, listed by hand: a-z, A-Z, 0-9, the six ASCII whitespace bytes (space,
    tab, LF, CR, VT, FF), the other 60 ASCII bytes (controls and DEL included), continuation bytes 0x80-0xBF, lead
    bytes 0xC0-0xFF (0xC0, 0xC1 and 0xF5-0xFF included), and the four special ids 0-3."""
    expected = {"lower": set(range(0x61, 0x7B)), "upper": set(range(0x41, 0x5B)), "digit": set(range(0x30, 0x3A)),
                "space": {0x20, 0x09, 0x0A, 0x0D, 0x0B, 0x0C}, "utf8_cont": set(range(0x80, 0xC0)),
                "utf8_lead": set(range(0xC0, 0x100))}
    expected["punct"] = set(range(0x80)) - set().union(*expected.values())
    got = {name: set() for name in train_gpt.BYTE_CLASSES}
    for token in range(260):
        got[train_gpt.BYTE_CLASSES[train_gpt.byte_class(token)]].add(token - train_gpt.BYTE_OFFSET)
    assert got.pop("bos") == {-4, -3, -2, -1}  # pad, BOS, EOS, unk
    assert got == expected
    assert {k: len(v) for k, v in got.items()} == dict(lower=26, upper=26, digit=10, space=6, punct=60, utf8_cont=64,
                                                       utf8_lead=64)


def test_log_final_lines_of_hand_made_sums():
    """Known sums, known lines: 4 targets of which 3 bytes, 4 ln 2 nats in all (bpb 4/3); a bucket's bpb is its nats
    in bits over its bytes ('-' for BOS, which has none), its share its nats over all nats; empty buckets are left
    out; the headline's loss is nats per target."""
    ln2 = math.log(2)
    labels = ["slot:0", "slot:1", "slot:2", "class:lower", "class:bos"]
    breakdown = torch.tensor([[3 * ln2, 3, 2], [ln2, 1, 1], [0, 0, 0], [3 * ln2, 3, 3], [ln2, 1, 0]],
                             dtype=torch.float64)
    totals = train_gpt.Totals(torch.tensor([4 * ln2, 4, 3], dtype=torch.float64), breakdown, labels)
    lines = []
    train_gpt.log_final(lines.append, "final_x", totals, eval_ms=1234.4)
    assert lines == [
        "final_x_breakdown slot:0 nats:2.0794415416798357 targets:3 bytes:2 bpb:1.500000 share:0.750000",
        "final_x_breakdown slot:1 nats:0.6931471805599453 targets:1 bytes:1 bpb:1.000000 share:0.250000",
        "final_x_breakdown class:lower nats:2.0794415416798357 targets:3 bytes:3 bpb:1.000000 share:0.750000",
        "final_x_breakdown class:bos nats:0.6931471805599453 targets:1 bytes:0 bpb:- share:0.250000",
        "final_x val_loss:0.6931 val_bpb:1.3333 eval_time:1234ms",
        "final_x_exact val_loss:0.69314718 val_bpb:1.33333333",
        "final_x_sums nll_nats:2.772588722239781 targets:4 bytes:3",
    ]


def test_breakdown_cost_tool_times_both_evaluations_and_restores_the_breakdown(tiny_args, monkeypatch):
    sys.path.insert(0, str(ROOT / "tools"))
    import breakdown_cost
    tiny_args()  # the tiny knobs, in the environment the tool reads
    add = train_gpt.Breakdown.add
    lines = breakdown_cost.measure(tokens=600, repeats=1)
    assert lines[0].startswith("breakdown_cost: device cpu") and "targets 599 repeats 1" in lines[0]
    for line, name in zip(lines[1:], ("standard", "sliding")):
        assert re.fullmatch(rf"breakdown_cost {name}: on \S+s off \S+s difference \S+% inside \S+%", line), line
        assert 0 < float(line.split("inside ")[1][:-1]) < 100, line
    assert train_gpt.Breakdown.add is add and "EVAL_BREAKDOWN" not in os.environ


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


@pytest.mark.parametrize("patching", [{}, WORD_PATCHES], ids=["fixed", "space"])
def test_sliding_evaluation_equals_a_direct_per_target_computation(tiny_args, cpu_runtime, patching):
    """Each target scored once, in the window the stride rule gives it (patched from the window's own start)."""
    args = tiny_args(VAL_SLIDING_STRIDE=24, TTT_CHUNK_TOKENS=64 * 100, **patching)
    model = randomize(train_gpt.build_model(args)).eval()
    tokens = stream(203, seed=3)
    totals, _ = train_gpt.evaluate_score_first(model, tokens, args, cpu_runtime, lambda m: None, False, 0.0)
    expected, nbytes = direct_sliding_nll(model, tokens, args.window, 24)
    assert totals.targets == 202 and int(totals.values[2]) == nbytes
    assert totals.values[0].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("patching", [{}, WORD_PATCHES], ids=["fixed", "space"])
def test_standard_evaluation_scores_the_tail_too(tiny_args, cpu_runtime, patching):
    args = tiny_args(**patching)
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


@pytest.mark.parametrize("patching", [{}, WORD_PATCHES], ids=["fixed", "space"])
@pytest.mark.parametrize("k", [0, 2])
def test_ttt_scores_never_see_later_chunks(tiny_args, cpu_runtime, k, patching):
    """Legality: changing the validation bytes of chunk k+1 and later leaves every score of chunks <= k
    bit-identical, with adaptation on."""
    args = tiny_args(TTT_LR=0.05, TTT_EPOCHS=2, **patching)
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


@pytest.mark.parametrize("other_over", [True, False])
def test_ranks_stop_adapting_together_when_another_rank_is_over_the_budget(tiny_args, cpu_runtime, monkeypatch,
                                                                           other_over):
    """Two ranks decide on the time budget together (simulated: this rank scores and adapts on every window, the other
    on none, and the other projects past EVAL_MAX_SECONDS or not): when only the other rank is over, this one stops
    adapting too, before chunk 1, and scores as the sliding evaluation does; when neither is, all 4 chunks adapt."""
    monkeypatch.setattr(train_gpt, "rank_share", lambda items, rt: items)

    def all_reduce(t, op=train_gpt.dist.ReduceOp.SUM, group=None):  # the other rank adds nothing to any sum
        if op == train_gpt.dist.ReduceOp.MAX and t.numel() == 2:  # the budget's verdict and the stop signal
            t[0] = max(t[0].item(), float(other_over))

    monkeypatch.setattr(train_gpt.dist, "all_reduce", all_reduce)
    cpu_runtime.world = 2
    tokens, lines = stream(1100, seed=1), []
    ttt, _ = score_first(tiny_args(TTT_LR=0.05, EVAL_MAX_SECONDS=1e6), cpu_runtime, tokens, log=lines.append)
    sliding, _ = score_first(tiny_args(), cpu_runtime, tokens, adapt=False)
    stops = [line for line in lines if line.startswith("ttt_budget_stop:")]
    assert ttt.targets == 1099 and ("adapted_chunks:0" if other_over else "adapted_chunks:4") in lines[-2], lines
    if other_over:
        assert len(stops) == 1 and "before chunk 1/5" in stops[0] and torch.equal(ttt.values, sliding.values)
    else:
        assert not stops and not torch.equal(ttt.values, sliding.values)


def test_ttt_steps_are_the_same_on_two_ranks_as_on_one(tiny_args, cpu_runtime, monkeypatch):
    """A chunk whose windows all hold the same bytes, adapted on one rank, and on rank 0 of two (simulated: the
    all-reduce adds the other rank's gradient, which is this one's): each step's gradient is the mean over the batch's
    windows, whichever rank holds them, so the weights end alike (no clipping, which would hide a scale)."""
    args = tiny_args(TTT_LR=0.05, TTT_MOMENTUM=0.9, TTT_GRAD_CLIP=0, TTT_BATCH_SEQS=2, TTT_EPOCHS=2)
    chunk = np.tile(stream(63, seed=3), 5)[:256]  # windows every 63 bytes: four windows, all the same bytes

    def adapted(world: int) -> list[torch.Tensor]:
        model = randomize(train_gpt.build_model(args), 2, std=0.1)
        params = train_gpt.ttt_parameters(model, args)
        opt = torch.optim.SGD(params, lr=args.ttt_lr, momentum=args.ttt_momentum)
        cpu_runtime.world = world
        train_gpt.adapt_on_chunk(model, model, opt, params, chunk, args, cpu_runtime)
        return [p.detach() for p in params]

    one = adapted(1)

    def all_reduce(t, op=train_gpt.dist.ReduceOp.SUM, group=None):
        if op == train_gpt.dist.ReduceOp.SUM:
            t.mul_(2)

    monkeypatch.setattr(train_gpt.dist, "all_reduce", all_reduce)
    two = adapted(2)
    start = [p.detach() for p in train_gpt.ttt_parameters(randomize(train_gpt.build_model(args), 2, std=0.1), args)]
    assert not torch.equal(one[0], start[0])
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_weights_gone_non_finite_are_never_scored(tiny_args, cpu_runtime):
    """An adaptation step that makes the weights non-finite (TTT_LR=1e30) stops the evaluation at the next chunk's
    scoring with a line naming the chunk, the value and TTT_LR, on every rank alike (the sums are all-reduced); a
    standard evaluation of non-finite weights stops the same way. No score of such weights is ever logged."""
    lines, tokens = [], stream(1100, seed=1)
    with pytest.raises(train_gpt.Diverged) as stop:
        score_first(tiny_args(TTT_LR=1e30, TTT_GRAD_CLIP=0), cpu_runtime, tokens, log=lines.append)
    assert re.fullmatch(r"evaluation \(ttt, chunk 2/5\) scored a non-finite loss \((nan|inf)\); no score is reported "
                        r"\(after TTT's adaptation: lower TTT_LR\)", str(stop.value)) and stop.value.exit_code == 5
    assert [line[:23] for line in lines] == ["ttt_chunk:1/5 running_b"]  # chunk 1, scored before any adaptation
    model = train_gpt.build_model(tiny_args())
    with torch.no_grad():
        model.head.weight[0, 0] = math.nan
    with pytest.raises(train_gpt.Diverged, match=r"scored a non-finite loss \(nan\)"):
        train_gpt.evaluate_standard(model, tokens, tiny_args(), cpu_runtime)


def test_a_stop_signal_ends_ttt_adaptation_before_its_next_step(tiny_args, cpu_runtime, monkeypatch):
    """A chunk's adaptation (here 50 epochs) checks for a stop signal before every SGD step, where the ranks meet:
    a pending SIGTERM ends it before any weight moves."""
    args = tiny_args(TTT_EPOCHS=50, TTT_LR=0.05)
    model = randomize(train_gpt.build_model(args))
    params = train_gpt.ttt_parameters(model, args)
    before = [p.detach().clone() for p in params]
    monkeypatch.setattr(train_gpt.Stopped, "signum", signal.SIGTERM)
    with pytest.raises(train_gpt.Stopped, match="SIGTERM") as stop:
        train_gpt.adapt_on_chunk(model, model, torch.optim.SGD(params, lr=args.ttt_lr), params, stream(512), args,
                                 cpu_runtime)
    assert stop.value.exit_code == 143 and all(torch.equal(p, q) for p, q in zip(params, before))


def test_sigterm_during_evaluation_keeps_the_artifact_for_eval_only(corpus, tmp_path):
    """SIGTERM during score-first TTT: the run stops within seconds (within one adaptation step, here of 4000 epochs a
    chunk) with one line naming the phase and the EVAL_ONLY command that finishes the job; the artifact it wrote is
    complete; no submission."""
    env = tiny_env(corpus, ITERATIONS=2, QUANT="rtn", PREQUANT_EVAL=0, ROUNDTRIP_EVAL=0, TTT_EPOCHS=4000)
    run, waited = signal_run(tmp_path, env, "Total submission size")  # the artifact is on disk; TTT comes next
    assert run.proc.returncode == 128 + signal.SIGTERM and waited < 10, (run.proc.returncode, waited)
    assert re.fullmatch(r"error: stopped by SIGTERM during evaluation \(ttt, chunk [1-9]/9\); the artifact "
                        r"final_model\.int6\.ptz is complete: finish the evaluation with EVAL_ONLY=final_model\.int6"
                        r"\.ptz python3 train_gpt\.py and the same knobs", one_error_line(run))
    artifact = tmp_path / train_gpt.ARTIFACT_NAME
    assert artifact.stat().st_size == int(re.search(r"^Serialized model int6\+lzma: (\d+) bytes", run.log, re.M)[1])
    assert train_gpt.read_artifact(artifact) and not leftovers(tmp_path)
    assert not run.lines("final_ttt") and not (tmp_path / "logs" / "test.submission.json").exists()


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


def test_word_patches_end_to_end(corpus, tmp_path):
    """PATCHING=space through a real run: the patching lines (training and validation), every evaluation scoring
    each validation target once, the breakdown's slots those of the word patches, adding up."""
    run = run_script(tmp_path, tiny_env(corpus, ITERATIONS=3, SLIDING_EVAL=1, EVAL_MAX_SECONDS=1e6, **WORD_PATCHES),
                     run_id="words")
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    val = np.concatenate([train_gpt.load_data_shard(p) for p in sorted(corpus.glob("fineweb_val_*.bin"))])
    lines = run.lines("patching: ")
    assert [line.split("(")[1].split(":")[0] for line in lines] == ["validation", "training, the first 4 steps' bytes"]
    windows = torch.from_numpy(val[:len(val) // 64 * 64].astype(np.int64)).view(-1, 64)
    patch, slot, tail = train_gpt.patch_layout(windows, "space", 8, 24)
    mean, longest, capped = re.search(r"mean_len:(\S+) max_len:(\d+) capped:(\S+)%", lines[0]).groups()
    assert float(mean) == pytest.approx(windows.numel() / (patch[:, -1] + 1).sum().item(), abs=0.005)
    assert int(longest) == slot.max().item() + 1 <= 8
    assert float(capped) == pytest.approx(100 * (64 - tail).sum().item() / windows.numel(), abs=0.0005)
    for label in ("final_int6_lzma_roundtrip", "final_sliding", "final_ttt"):
        assert f"targets:{len(val) - 1} " in run.lines(f"{label}_sums")[-1], label
        rows, headline, shares = logged_breakdown(run.log.splitlines(), label)
        assert_breakdown_adds_up(rows, headline, shares)
        assert {k for k in rows if k.startswith("slot:")} == {f"slot:{i}" for i in range(int(longest))}
    assert run.lines("ttt_targets_scored:")[0].endswith(" ok")


@pytest.mark.parametrize("evaluations, final", [
    (("final_int6_lzma_roundtrip", "final_sliding", "final_ttt"), "final_ttt"),
    (("final_int6_lzma_roundtrip", "final_sliding"), "final_sliding"),
    (("final_int6_lzma_roundtrip",), "final_int6_lzma_roundtrip")])
def test_the_submission_s_score_is_the_last_evaluation_run(tiny_args, cpu_runtime, tmp_path, monkeypatch, evaluations,
                                                          final):
    """submission.json's val_bpb and val_loss are TTT's when it ran, else the sliding evaluation's, else the round
    trip's; pre_quant_* are the averaged weights' (bpb 1.3, 1.2, 1.1, 1.0 here), the facts are copied."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    args = tiny_args(RUN_ID="sub")
    bpb = dict(final_prequant=1.3, final_int6_lzma_roundtrip=1.2, final_sliding=1.1, final_ttt=1.0)
    results = {label: train_gpt.Totals(torch.tensor([math.log(2) * 100 * bpb[label], 125, 100], dtype=torch.float64))
               for label in ("final_prequant",) + evaluations}
    facts = dict(step_stop=6, wallclock_seconds=1.5, bytes_total=1000, bytes_model_int6_lzma=900, bytes_code=100)
    train_gpt.write_submission(args, cpu_runtime, lambda msg: None, results, facts)
    info = json.loads((tmp_path / "logs" / "sub.submission.json").read_text())
    assert info["val_bpb"] == pytest.approx(bpb[final], rel=1e-12)
    assert info["val_loss"] == pytest.approx(math.log(2) * 100 * bpb[final] / 125, rel=1e-12)
    assert info["pre_quant_val_bpb"] == pytest.approx(1.3, rel=1e-12) and info["run_id"] == "sub"
    assert {k: info[k] for k in facts} == facts and info["track"] == "non_record"


# -----------------------------------------------------------------------------------------------------------------
# Score-first TTT: the weights that score a chunk, the adaptation itself, the time budget's projection
# -----------------------------------------------------------------------------------------------------------------


def spy_on_scoring(model, tokens: np.ndarray, window: int, chunk_tokens: int) -> list[tuple[set, torch.Tensor]]:
    """Every scoring forward (forward_logits under inference mode) is recorded as (the chunks whose targets its
    windows score, a copy of all the model's weights at that moment). A window is found by its bytes in the
    stream (random streams: every window is unique); it scores targets up to its end, so its chunk is
    (start + window - 1) // chunk_tokens."""
    where = {tokens[s:s + window].tobytes(): s for s in range(len(tokens) - window + 1)}
    calls, score = [], model.forward_logits

    def spy(ids):
        if torch.is_inference_mode_enabled():
            starts = {where[row.numpy().astype(np.uint16).tobytes()] for row in ids.cpu()}
            weights = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
            calls.append(({(s + window - 1) // chunk_tokens for s in starts}, weights))
        return score(ids)

    model.forward_logits = spy
    return calls


def weights_scoring(calls, chunk: int) -> list[torch.Tensor]:
    return [w for chunks, w in calls if chunk in chunks]


def test_every_chunk_is_scored_before_its_tokens_touch_a_weight(tiny_args, cpu_runtime):
    """Legality, for every chunk k: the weights that score chunk k are identical whatever chunk k and the later
    chunks contain (they may depend on chunks < k only, which were scored already)."""
    args = tiny_args(TTT_LR=0.05, TTT_EPOCHS=2, EVAL_MAX_SECONDS=1e6)
    a = stream(1200, seed=4)
    num_chunks = math.ceil(1200 / 256)

    def run(tokens):
        model = randomize(train_gpt.build_model(args), 0).eval()
        calls = spy_on_scoring(model, tokens, args.window, 256)
        train_gpt.evaluate_score_first(model, tokens, args, cpu_runtime, lambda m: None, True, time.perf_counter())
        return calls

    calls_a = run(a)
    first = weights_scoring(calls_a, 0)
    assert first and all(torch.equal(w, first[0]) for w in first)
    assert not torch.equal(weights_scoring(calls_a, num_chunks - 1)[0], first[0]), "no adaptation happened"
    for k in range(num_chunks):
        b = a.copy()
        b[k * 256:] = stream(1200 - k * 256, seed=50 + k)
        b[k * 256] = a[k * 256] + 1 if a[k * 256] < 259 else 4  # the chunk's first byte differs too
        calls_b = run(b)
        for c in range(k + 1):
            wa, wb = weights_scoring(calls_a, c), weights_scoring(calls_b, c)
            assert wa and len(wa) == len(wb)
            assert all(torch.equal(x, y) for x, y in zip(wa, wb)), \
                f"chunk {c} was scored with weights that depend on chunk {k} or later"


def reference_adaptation(model, tokens: np.ndarray, args) -> None:
    """Score-first TTT's adaptation as the README specifies it, written out: one SGD optimizer (momentum
    TTT_MOMENTUM) over every stored weight outside the first TTT_FREEZE_BLOCKS encoder blocks; for each chunk
    c but the last, lr = TTT_LR * (1 + cos(pi c / (chunks - 1))) / 2, then TTT_EPOCHS passes over the chunk's
    windows (overlapping by one byte) in batches of TTT_BATCH_SEQS, byte CE, grad-norm clip TTT_GRAD_CLIP."""
    frozen = {id(p) for block in model.blocks[:args.ttt_freeze_blocks] for p in block.parameters()}
    params = [p for n, p in model.named_parameters() if not n.startswith("projector.") and id(p) not in frozen]
    opt = torch.optim.SGD(params, lr=args.ttt_lr, momentum=args.ttt_momentum)
    size, window = args.ttt_chunk_tokens, args.window
    chunks = math.ceil(len(tokens) / size)
    model.train()
    for c in range(chunks - 1):
        for group in opt.param_groups:
            group["lr"] = args.ttt_lr * (1 + math.cos(math.pi * c / (chunks - 1))) / 2
        chunk = tokens[c * size:(c + 1) * size]
        starts = list(range(0, len(chunk) - window + 1, window - 1))
        for _ in range(args.ttt_epochs):
            for b in range(0, len(starts), args.ttt_batch_seqs):
                ids = torch.from_numpy(np.stack([chunk[s:s + window] for s in starts[b:b + args.ttt_batch_seqs]])
                                       .astype(np.int64))
                opt.zero_grad()
                model(ids)[0].backward()
                torch.nn.utils.clip_grad_norm_(params, args.ttt_grad_clip)
                opt.step()


def test_ttt_adapts_with_cosine_lr_momentum_and_frozen_blocks(tiny_args, cpu_runtime):
    """A real score-first TTT run ends with the weights of the written-out reference adaptation: the cosine
    schedule across chunks, SGD momentum carried across steps and chunks, the frozen block untouched."""
    args = tiny_args(TTT_LR=0.03, TTT_MOMENTUM=0.9, TTT_EPOCHS=2, TTT_FREEZE_BLOCKS=1, TTT_BATCH_SEQS=2,
                     TTT_GRAD_CLIP=1.0, EVAL_MAX_SECONDS=1e6)
    tokens = stream(1100, seed=2)
    model = randomize(train_gpt.build_model(args), 3, std=0.1).eval()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_gpt.evaluate_score_first(model, tokens, args, cpu_runtime, lambda m: None, True, time.perf_counter())
    reference = randomize(train_gpt.build_model(args), 3, std=0.1)
    reference_adaptation(reference, tokens, args)
    expected = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if name.startswith(("blocks.0.", "projector.")):
            assert torch.equal(p, initial[name]), f"{name} is frozen (or training-only) but moved"
        else:
            assert not torch.equal(p, initial[name]), f"{name} was not adapted"
            torch.testing.assert_close(p.detach(), expected[name].detach(), rtol=1e-4, atol=1e-6, msg=name)


def budgeted_ttt(tiny_args, cpu_runtime, monkeypatch, budget: float, first_score: float = 0.0,
                 first_adapt: float = 0.0):
    """6 chunks on a virtual clock: scoring a chunk costs 0.5 s (16 windows), adapting on one 0.5 s (4 windows,
    1 epoch), 1 s was spent before TTT began; the first scoring and the first adaptation may cost more (compilation).
    -> (chunks adapted, seconds to the finish, log lines, totals)."""
    args = tiny_args(TTT_LR=0.05, TTT_EPOCHS=1, TTT_BATCH_SEQS=2, EVAL_MAX_SECONDS=budget)
    tokens = stream(6 * 256, seed=6)
    model = randomize(train_gpt.build_model(args), 0).eval()
    clock, scored, trained = VirtualClock(monkeypatch), [], []

    def compiled_at_first_call(fn, seconds: float, calls: list):
        def first(ids, *rest):
            clock.now += 0.0 if calls else seconds
            return fn(ids, *rest)
        return first

    model.forward_logits = compiled_at_first_call(clock.charge(model.forward_logits, 0.5 / 16, scored), first_score,
                                                  scored)
    model.forward = compiled_at_first_call(clock.charge(model.forward, 0.5 / 4, trained), first_adapt, trained)
    lines = []
    eval_t0 = clock.now - 1.0
    totals, _ = train_gpt.evaluate_score_first(model, tokens, args, cpu_runtime, lines.append, True, eval_t0)
    assert sum(scored) == 6 * 16 and totals.targets == len(tokens) - 1
    return sum(trained) / 4, clock.now - eval_t0, lines, totals


def test_time_budget_projects_the_remaining_scoring_and_stops_adaptation_part_way(tiny_args, cpu_runtime,
                                                                                   monkeypatch):
    """Budget 5.25 s: scoring alone needs 1 + 6 x 0.5 = 4 s, so 2 adaptations fit and a 3rd would not: adaptation
    must stop part way, the evaluation must end inside the budget, and it must not give up more than one adaptation
    early."""
    adapted, finish, lines, _ = budgeted_ttt(tiny_args, cpu_runtime, monkeypatch, 5.25)
    assert len([line for line in lines if line.startswith("ttt_budget_stop:")]) == 1
    assert adapted == 2, f"{adapted} chunks adapted: exactly 2 fit the budget"
    assert finish <= 5.25, f"evaluation ran {finish:.2f}s past a 5.25s budget: the projection left out work"
    assert finish > 5.25 - 0.5, f"stopped at {finish:.2f}s: another adaptation (0.5s) would have fitted"


@pytest.mark.parametrize("budget, adapted", [(5.0, 2), (5.0 - 1 / 32, 1)])
def test_time_budget_at_its_edge(tiny_args, cpu_runtime, monkeypatch, budget, adapted):
    """The projection before chunk 2's adaptation is exactly 2.5 s spent + 0.5 s adapting + 4 chunks x 0.5 s scoring =
    5.0 s (every figure a multiple of 1/32 s: exact). A finish exactly at the budget is inside it: with 5.0 s the 2nd
    adaptation runs and the evaluation ends at 5.0 s; 1/32 s less and it does not, ending at 4.5 s."""
    got, finish, lines, _ = budgeted_ttt(tiny_args, cpu_runtime, monkeypatch, budget)
    stop = [line for line in lines if line.startswith("ttt_budget_stop:")]
    assert (got, finish) == (adapted, 5.0 if adapted == 2 else 4.5)
    assert len(stop) == 1 and f"before chunk {adapted + 1}/6: projected finish " in stop[0], stop


def test_time_budget_rates_leave_out_the_compilation(tiny_args, cpu_runtime, monkeypatch):
    """The first scoring costs 2 s more and the first adaptation 1 s more (compilation). The projections use the later
    chunks' rates (0.5 s each), the single first adaptation's own 1.5 s while it is the only one: 3.5 s spent before
    chunk 0's adaptation (projected 3.5 s), then 5.5 + 1.5 + 4 x 0.5 = 9.0, 6.5 + 0.5 + 3 x 0.5 = 8.5, 7.5 + 0.5 + 2 x
    0.5 = 9.0 and 8.5 + 0.5 + 0.5 = 9.5: under a 9 s budget chunks 0-3 adapt and the evaluation ends at 9.0 s."""
    adapted, finish, lines, _ = budgeted_ttt(tiny_args, cpu_runtime, monkeypatch, 9.0, first_score=2.0,
                                             first_adapt=1.0)
    stop = [line for line in lines if line.startswith("ttt_budget_stop:")]
    assert (adapted, finish) == (4, 9.0)
    assert len(stop) == 1 and "before chunk 5/6: projected finish 9.5s" in stop[0], stop


@pytest.mark.parametrize("flaw", ["a window twice", "a window left out"])
def test_a_scored_target_count_mismatch_is_an_error(tiny_args, cpu_runtime, monkeypatch, flaw):
    """A plan that scores a target twice, or not at all, must stop the evaluation, never yield a score."""
    share = (lambda items, rt: items + items[:1]) if flaw == "a window twice" else (lambda items, rt: items[1:])
    monkeypatch.setattr(train_gpt, "rank_share", share)
    args = tiny_args()
    model = randomize(train_gpt.build_model(args)).eval()
    tokens = stream(1100, seed=1)
    with pytest.raises(train_gpt.TargetCountMismatch, match="1099"):
        train_gpt.evaluate_standard(model, tokens, args, cpu_runtime)
    with pytest.raises(train_gpt.TargetCountMismatch, match="1099"):
        train_gpt.evaluate_score_first(model, tokens, args, cpu_runtime, lambda m: None, True, time.perf_counter())


@pytest.mark.parametrize("roundtrip", [0, 1])
def test_a_target_count_mismatch_stops_the_run_with_one_line(corpus, tmp_path, monkeypatch, capsys, roundtrip):
    """Through main: the evaluation that miscounts (standard round trip, or TTT) ends the run with one error line
    and a non-zero status; no final score and no submission file are written."""
    for k, v in tiny_env(corpus, ROUNDTRIP_EVAL=roundtrip, PREQUANT_EVAL=0, RUN_ID="mismatch").items():
        monkeypatch.setenv(k, v)
    artifact = tmp_path / "a.ptz"
    model = randomize(train_gpt.build_model(train_gpt.Hyperparameters()), std=0.05)
    artifact.write_bytes(train_gpt.serialize_artifact(train_gpt.quantize_state(model.state_dict())))
    monkeypatch.setenv("EVAL_ONLY", str(artifact))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_gpt, "rank_share", lambda items, rt: items + items[-1:])
    status = train_gpt.main()
    err = capsys.readouterr().err.splitlines()
    assert status not in (0, 2, 3)
    assert len(err) == 1 and err[0].startswith("error: ") and "targets" in err[0], err
    log = (tmp_path / "logs" / "mismatch.txt").read_text().splitlines()
    assert not [line for line in log if line.startswith("final_")]
    assert not (tmp_path / "logs" / "mismatch.submission.json").exists()


@pytest.mark.parametrize("patching", [{}, WORD_PATCHES], ids=["fixed", "space"])
def test_priming_compiles_the_scoring_and_ttt_graphs_before_any_clock(tiny_args, tmp_path, monkeypatch, patching):
    """Compilation forced on: priming compiles the training, scoring and TTT graphs, so evaluating the artifact's
    fresh model compiles nothing new and no compile time lands on the eval clock. Which graphs exist is decided by
    Dynamo's guards (shapes, dtypes, requires_grad), the same whatever the backend: aot_eager traces forward and
    backward as inductor would, in seconds instead of minutes. A frozen block makes TTT's requires_grad pattern
    differ from training's, as priming must reproduce."""
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="aot_eager", **kw))
    monkeypatch.chdir(tmp_path)  # the artifact is written to the working folder
    args = tiny_args(ITERATIONS=2, WARMUP_STEPS=1, TTT_EPOCHS=1, PREQUANT_EVAL=0, TTT_FREEZE_BLOCKS=1, **patching)
    rt = train_gpt.Runtime(args)
    rt.compile = True
    val = train_gpt.load_validation_tokens(args)
    model = train_gpt.build_model(args)
    lines = []
    train_gpt.Trainer(args, rt, model, val, lines.append).run()
    primed = counters["stats"]["unique_graphs"]
    path = train_gpt.export_artifact(model, None, args, rt, lines.append)
    train_gpt.evaluate_artifact(path, args, rt, val, lines.append)
    assert [line for line in lines if line.startswith(("final_int6_lzma_roundtrip_exact", "final_ttt_exact"))]
    assert counters["stats"]["unique_graphs"] == primed, "evaluation compiled a graph that priming should have"
