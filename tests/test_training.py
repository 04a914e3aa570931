"""Training: schedule, Muon, and end-to-end runs (loss falls, 1 vs 2 processes, validation and priming
leave training unharmed, the wallclock cap; a diverged, a stopped and a stalled run end at once, with one line)."""
import json
import math
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

import train_gpt
from conftest import (DIVERGING_LRS, REFERENCE, REFERENCE_RECIPE, ROOT, VirtualClock, assert_breakdown_adds_up,
                      earlier_artifact, leftovers, logged_breakdown, one_error_line, randomize, realistic, run_main,
                      run_script, signal_run, tiny_env)


def train_losses(run) -> dict[int, float]:
    out = {}
    for line in run.lines("step:"):
        if "train_loss:" in line:
            out[int(line.split("/")[0][5:])] = float(line.split("train_loss:")[1].split()[0])
    return out


def test_lr_scale_by_steps_without_a_cap(tiny_args):
    args = tiny_args(ITERATIONS=100, WARMDOWN_ITERS=20, MAX_WALLCLOCK_SECONDS=0)
    assert train_gpt.lr_scale(0, 0.0, args) == 1.0
    assert train_gpt.lr_scale(79, 0.0, args) == 1.0
    assert train_gpt.lr_scale(80, 0.0, args) == pytest.approx(1.0)
    assert train_gpt.lr_scale(90, 0.0, args) == pytest.approx(0.5)
    assert train_gpt.lr_scale(100, 0.0, args) == 0.0


def test_lr_scale_by_remaining_wallclock_with_a_cap(tiny_args):
    """WARMDOWN_FRAC=auto (the reference): the warmdown lasts WARMDOWN_ITERS steps at the step time so far."""
    args = tiny_args(WARMDOWN_ITERS=100, MAX_WALLCLOCK_SECONDS=10, QUANT="rtn", WARMDOWN_FRAC="auto")
    # 50 steps in 2 s: 40 ms/step, so the warmdown lasts 100 steps = 4 s, starting at 6 s
    assert train_gpt.lr_scale(50, 2000.0, args) == 1.0
    assert train_gpt.lr_scale(150, 6000.0, args) == pytest.approx(1.0)
    assert train_gpt.lr_scale(200, 8000.0, args) == pytest.approx(0.5)
    assert train_gpt.lr_scale(250, 10_500.0, args) == 0.0


def test_gptq_reserve_shortens_the_training_cap(tiny_args):
    assert tiny_args(MAX_WALLCLOCK_SECONDS=600, QUANT="gptq", GPTQ_RESERVE_SECONDS=20).training_cap_seconds() == 580
    assert tiny_args(MAX_WALLCLOCK_SECONDS=600, QUANT="rtn", GPTQ_RESERVE_SECONDS=20).training_cap_seconds() == 600
    assert tiny_args(MAX_WALLCLOCK_SECONDS=0).training_cap_seconds() == 0


def test_warmdown_fraction_of_the_cap(tiny_args):
    """With a cap, WARMDOWN_FRAC sets the warmdown's share of the capped time (the cap less a GPTQ reserve, when
    given), whatever the step time; without one, WARMDOWN_ITERS still does."""
    args = tiny_args(MAX_WALLCLOCK_SECONDS=10, WARMDOWN_FRAC=0.75, ITERATIONS=100, WARMDOWN_ITERS=20, QUANT="rtn")
    assert train_gpt.lr_scale(10, 2499.0, args) == 1.0
    for step in (1, 300):  # the measured step time does not matter
        assert train_gpt.lr_scale(step, 6250.0, args) == pytest.approx(0.5)
    assert train_gpt.lr_scale(400, 10_000.0, args) == 0.0
    assert train_gpt.lr_scale(1, 5000.0, args, cap_ms=8000.0) == pytest.approx(0.5)  # a 2 s reserve: ends at 8 s
    args = tiny_args(MAX_WALLCLOCK_SECONDS=0, WARMDOWN_FRAC=0.75, ITERATIONS=100, WARMDOWN_ITERS=20)
    assert train_gpt.lr_scale(79, 0.0, args) == 1.0
    assert train_gpt.lr_scale(90, 0.0, args) == pytest.approx(0.5)
    defaults = tiny_args(MAX_WALLCLOCK_SECONDS=10, WARMDOWN_FRAC="")  # 72% of the cap
    assert train_gpt.lr_scale(1, 2799.0, defaults) == 1.0
    assert train_gpt.lr_scale(1, 6400.0, defaults) == pytest.approx(0.5)


def test_lr_floor_lifts_the_learning_rate_not_the_schedule(tiny_args):
    """LR_FLOOR: every group's LR runs from its base to LR_FLOOR x base over the warmdown, while the scale that late
    QAT and SWA compare with their thresholds still runs to 0, as without a floor."""
    args = tiny_args(LR_FLOOR=0.1, ITERATIONS=100, WARMDOWN_ITERS=20, MAX_WALLCLOCK_SECONDS=0)
    assert train_gpt.lr_scale(100, 0.0, args) == 0.0
    trainer = train_gpt.Trainer(args, train_gpt.Runtime(args), train_gpt.build_model(args),
                                train_gpt.load_validation_tokens(args), lambda line: None)
    for scale in (1.0, 0.5, 0.0):
        trainer.step(0, scale)
        for group in (g for opt in trainer.optimizers for g in opt.param_groups):
            assert group["lr"] == pytest.approx(group["base_lr"] * (0.1 + 0.9 * scale))


def test_weight_decay_spares_the_control_tensors(tiny_args, cpu_runtime):
    """WEIGHT_DECAY is decoupled: a step with zero gradients shrinks the matrices of linear layers (Muon's and the
    head), the embeddings and slot positions by (1 - lr wd) and leaves the control tensors (gains, scales, mixes,
    start latent) as they were."""
    args = tiny_args(WEIGHT_DECAY=0.5, DECODER_LAYERS=2)
    model = randomize(train_gpt.build_model(args))
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, (train_gpt.CastedLinear, torch.nn.Embedding))}
    decayed.add(id(model.slot_pos))
    optimizers = train_gpt.build_optimizers(model, args, cpu_runtime)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = 0.5 * group["base_lr"]  # the scheduled LR decays, not the base
        opt.step()
    lr = {id(p): g["lr"] for opt in optimizers for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        factor = 1 - 0.5 * lr[id(p)] if id(p) in decayed else 1.0
        torch.testing.assert_close(p.detach(), factor * before[name], msg=name)
    spared = {name for name, p in model.named_parameters() if id(p) not in decayed}
    assert {"start_latent", "blocks.0.attn_scale", "blocks.1.mlp_scale",
            "dec_blocks.1.resid_mix", "dec_blocks.0.attn.q_gain"} <= spared
    assert all(p.ndim == 2 and name.endswith("weight") or name == "slot_pos"
               for name, p in model.named_parameters() if id(p) in decayed)


def test_muon_momentum_warms_up_linearly(tiny_args):
    args = tiny_args(MUON_MOMENTUM_WARMUP_STEPS=100)
    assert train_gpt.muon_momentum(0, args) == pytest.approx(0.92)
    assert train_gpt.muon_momentum(50, args) == pytest.approx(0.885)  # the default 0.85 sits below the start
    assert train_gpt.muon_momentum(100, args) == pytest.approx(0.85)
    assert train_gpt.muon_momentum(5000, args) == pytest.approx(0.85)
    args = tiny_args(MUON_MOMENTUM_WARMUP_STEPS=100, MUON_MOMENTUM=0.96)
    assert train_gpt.muon_momentum(50, args) == pytest.approx(0.94)


@pytest.mark.parametrize("shape", [(32, 32), (64, 16), (16, 96)])
def test_newton_schulz_makes_singular_values_near_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(train_gpt.newton_schulz_orthogonalize(g, 5))
    raw = torch.linalg.svdvals(g)
    assert raw.max() / raw.median() > 1.5  # the input is far from orthogonal
    assert s.min().item() > 0.5 and s.max().item() < 1.3  # the quintic iteration's band around 1


def test_muon_update_is_orthogonalised_and_scaled(cpu_runtime):
    p = torch.nn.Parameter(torch.zeros(48, 16))
    opt = train_gpt.Muon([p], lr=0.1, momentum=0.0, backend_steps=5, rt=cpu_runtime)
    p.grad = torch.randn(48, 16)
    opt.step()
    expected = -0.1 * train_gpt.newton_schulz_orthogonalize(p.grad, 5) * math.sqrt(48 / 16)
    torch.testing.assert_close(p.detach(), expected)


def reference_newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of Muon (coefficients 3.4445, -4.7750, 2.0315) in float64, on the
    wide orientation of g, from g scaled to unit Frobenius norm."""
    x = g.double() / g.double().norm()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        a = x @ x.T
        x = 3.4445 * x - 4.7750 * a @ x + 2.0315 * a @ a @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(48, 16), (16, 40)])
@pytest.mark.parametrize("row_norm,wd", [(False, 0.0), (True, 0.0), (False, 0.5)])
def test_muon_steps_match_nesterov_momentum_then_newton_schulz(cpu_runtime, shape, row_norm, wd):
    """Three steps with momentum 0.9 and changing gradients against the textbook update: buf = m buf + g,
    n = g + m buf (Nesterov), with row_norm (MuonEq-R) each row of n divided by its norm, update = orthogonalise(n),
    p = (1 - lr wd) p - lr * sqrt(max(1, rows / cols)) * update (decoupled weight decay)."""
    lr, m = 0.05, 0.9
    g = torch.Generator().manual_seed(1)
    start = torch.randn(*shape, generator=g)
    p = torch.nn.Parameter(start.clone())
    opt = train_gpt.Muon([p], lr=lr, momentum=m, backend_steps=5, rt=cpu_runtime, weight_decay=wd, row_norm=row_norm)
    expected, buf = start.double(), torch.zeros(shape, dtype=torch.float64)
    for _ in range(3):
        grad = torch.randn(*shape, generator=g)
        grad[0] *= 50  # one loud output row: row normalisation changes the update
        p.grad = grad.clone()
        opt.step()
        buf = m * buf + grad.double()
        nesterov = grad.double() + m * buf
        nesterov = nesterov / nesterov.norm(dim=1, keepdim=True) if row_norm else nesterov
        update = reference_newton_schulz(nesterov) * max(1.0, shape[0] / shape[1]) ** 0.5
        expected = (1 - lr * wd) * expected - lr * update
        torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=2e-5)


def test_newton_schulz_orthogonalises_each_matrix_of_a_stack_on_its_own():
    """A stack of one shape, as Muon batches it: each matrix as the float64 iteration makes it from itself alone
    (its own norm, not the stack's), and a zero matrix (Muon's padding) stays zero."""
    gen = torch.Generator().manual_seed(2)
    stack = torch.stack([torch.randn(24, 8, generator=gen) * scale for scale in (1.0, 30.0, 0.0)])
    out = train_gpt.newton_schulz_orthogonalize(stack, 5)
    for i in range(2):
        torch.testing.assert_close(out[i].double(), reference_newton_schulz(stack[i]), rtol=0, atol=2e-5)
    assert out[2].abs().max().item() == 0.0


class RankZeroOfTwo:
    """Rank 0 of a world of 2 for Muon, recording what it sends. Rank 1's gradients are taken to be 3 times rank 0's,
    so the reduce-scatter returns 4 times rank 0's share; the all-gather returns what rank 0 sent, then rank 1's
    updates as the sent ones + 100 (values rank 0 could not have computed)."""

    rank, world, compile = 0, 2, False

    def __init__(self):
        self.scattered, self.sent = [], []

    def reduce_scatter(self, t):
        self.scattered.append(t.clone())
        return 4.0 * t[:t.size(0) // 2]

    def all_gather(self, t):
        self.sent.append(t.clone())
        return torch.cat([t, t + 100.0])


def test_muon_reduces_and_orthogonalises_its_share_of_each_shape_and_gathers_the_rest():
    """Three 16x8 matrices and one 8x8 on rank 0 of 2: each shape's gradients are reduce-scattered as one stack,
    padded with zero matrices to a multiple of 2; rank 0 keeps momentum for, orthogonalises and sends only its share
    (the first two 16x8, the 8x8), from the gradients summed over ranks; every parameter then takes its update from
    the gathered stack, rank 1's included, in the stack's order."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.zeros(*shape)) for shape in [(16, 8), (8, 8), (16, 8), (16, 8)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    rt = RankZeroOfTwo()
    opt = train_gpt.Muon(params, lr=0.1, momentum=0.5, backend_steps=5, rt=rt)
    opt.step()
    tall_grads, square_grads = rt.scattered
    torch.testing.assert_close(tall_grads, torch.stack([params[0].grad, params[2].grad, params[3].grad,
                                                        torch.zeros(16, 8)]), rtol=0, atol=0)
    torch.testing.assert_close(square_grads, torch.stack([params[1].grad, torch.zeros(8, 8)]), rtol=0, atol=0)
    assert [tuple(t.shape) for t in rt.sent] == [(2, 16, 8), (1, 8, 8)]
    assert set(opt.state) == {params[0], params[2], params[1]}
    torch.testing.assert_close(opt.state[params[2]]["momentum"], 4.0 * params[2].grad)
    tall, square = rt.sent
    for p, sent in [(params[0], tall[0]), (params[2], tall[1]), (params[3], tall[0] + 100), (params[1], square[0])]:
        torch.testing.assert_close(p.detach(), -0.1 * sent)
    nesterov = 4.0 * params[0].grad * 1.5  # g + m * (m * 0 + g), with g summed over ranks
    torch.testing.assert_close(tall[0].double(), reference_newton_schulz(nesterov) * 2 ** 0.5, rtol=0, atol=3e-5)


@pytest.mark.parametrize("ngrams", [0, 97])
def test_optimizer_groups_cover_every_parameter_once(tiny_args, cpu_runtime, ngrams):
    """Embeddings (the n-gram tables among them) and slot positions in Adam at EMBED_LR, the head at HEAD_LR,
    linear layers in Muon, the rest (gains, scales, mixes, the smear gate) in Adam at SCALAR_LR."""
    args = tiny_args(NGRAM_BUCKETS=ngrams, SMEAR_GATE=1)
    model = train_gpt.build_model(args)
    adam, muon = train_gpt.build_optimizers(model, args, cpu_runtime)
    groups = [g["params"] for g in adam.param_groups] + [muon.param_groups[0]["params"]]
    ids = [id(p) for group in groups for p in group]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert all(p.ndim == 2 for p in muon.param_groups[0]["params"])
    assert [g["lr"] for g in adam.param_groups] == [args.embed_lr, args.head_lr, args.scalar_lr]
    assert adam.param_groups[1]["params"] == [model.head.weight]
    tables = [model.patch_ngrams.table.weight, model.dec_ngrams.table.weight] if ngrams else []
    embed = {id(p) for p in [model.byte_emb.weight, model.dec_emb.weight, model.slot_pos] + tables}
    assert {id(p) for p in adam.param_groups[0]["params"]} == embed
    assert {id(model.smear.weight), id(model.smear.mix)} <= {id(p) for p in adam.param_groups[2]["params"]}


@pytest.fixture(scope="module")
def twin_runs(seed_runs, two_process_run):
    """The same tiny run on 1 and on 2 processes (gloo), with validation at step 3 and TTT."""
    return seed_runs[1], two_process_run


def test_one_and_two_processes_give_the_same_step_losses(twin_runs):
    one, two = twin_runs
    assert one.proc.returncode == 0, one.proc.stderr[-3000:]
    assert two.proc.returncode == 0, two.proc.stderr[-3000:]
    assert "world_size:2 grad_accum_steps:4" in two.log
    a, b = train_losses(one), train_losses(two)
    assert sorted(a) == list(range(1, 7)) and sorted(b) == sorted(a)
    for step in a:
        # printed with 4 decimals: seen equal, but values 1e-7 apart may round one unit (1e-4) apart
        assert b[step] == pytest.approx(a[step], abs=1.5e-4), f"step {step}"
    for label in ("step:3/6 val", "final_int6_lzma_roundtrip_exact", "final_ttt_exact"):
        # seen: equal to 4 decimals (periodic validation), within 1e-7 relative (the 8-decimal final lines)
        assert two.value(label, "val_bpb") == pytest.approx(one.value(label, "val_bpb"), rel=1e-6), label


def test_one_and_two_processes_score_every_target_once(twin_runs, corpus):
    """Sums, not only ratios: each evaluation's summed NLL, target count and byte count over both ranks equal the
    one-process figures, and the counts are the validation split's (each target once, none twice)."""
    one, two = twin_runs
    val = np.concatenate([train_gpt.load_data_shard(p) for p in sorted(corpus.glob("fineweb_val_*.bin"))])
    targets, nbytes = len(val) - 1, int((val[1:] >= 4).sum())
    for label in ("final_prequant", "final_int6_lzma_roundtrip", "final_ttt"):
        a, b = one.lines(f"{label}_sums")[-1], two.lines(f"{label}_sums")[-1]
        for run_line in (a, b):
            assert f"targets:{targets} bytes:{nbytes}" in run_line, (label, run_line, targets, nbytes)
        nll_a, nll_b = (float(line.split("nll_nats:")[1].split()[0]) for line in (a, b))
        assert nll_b == pytest.approx(nll_a, rel=1e-6), label  # seen: 1e-7 relative (reduction order)
        # the breakdown: each grouping adds up to the sums on either run, and each rank's buckets are reduced
        (rows_a, *sums_a), (rows_b, *sums_b) = (logged_breakdown(run.log.splitlines(), label) for run in (one, two))
        assert_breakdown_adds_up(rows_a, *sums_a)
        assert_breakdown_adds_up(rows_b, *sums_b)
        assert {k: v[1:] for k, v in rows_a.items()} == {k: v[1:] for k, v in rows_b.items()}, label
    for run in (one, two):
        assert run.lines(f"ttt_targets_scored:{targets} expected:{targets} ok")


def test_logged_flops_and_early_size_estimate(twin_runs, tiny_args):
    """The FLOP line carries the analytic counts of this configuration; the early size estimate is logged once
    (rank 0) and lands near the final artifact's size (fp16 weights at this size compress alike)."""
    one, two = twin_runs
    args = tiny_args()
    parts = [train_gpt.flops_per_byte(args, training) for training in (True, False)]
    expected = [round(sum(p.values())) for p in parts]
    for run in (one, two):
        train, evaluation = re.search(r"^flops_per_byte train:(\d+) eval:(\d+)$", run.log, re.M).groups()
        assert [int(train), int(evaluation)] == expected
        estimate = run.lines("size_estimate: weights at step 1 would compress to")
        assert len(estimate) == 1, estimate
        guess = int(re.search(r"compress to (\d+) bytes", estimate[0]).group(1))
        final = int(re.search(r"(\d+) bytes", run.lines("Serialized model int6+lzma:")[0]).group(1))
        assert 0.75 * final < guess < 1.25 * final, (guess, final)


def test_loss_falls_on_a_small_corpus(corpus, tmp_path):
    """Without PREQUANT_EVAL the last step validates the live weights; the artifact holds their EMA."""
    env = tiny_env(corpus, ITERATIONS=16, TRAIN_LOG_EVERY=8, TTT_ENABLED=0, PREQUANT_EVAL=0)
    run = run_script(tmp_path, env, run_id="fall")
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    losses = train_losses(run)
    assert losses[1] == pytest.approx(math.log(260), abs=0.05)
    assert losses[16] < losses[1] - 2.0
    assert run.value("step:16/16 val", "val_bpb") < 4.0
    # the exported weights are the EMA (decay 0.9) of the trained ones: as good, and not the live weights
    live = run.value("step:16/16 val", "val_bpb")
    averaged = run.value("final_int6_lzma_roundtrip_exact", "val_bpb")  # no int6 tensor at this size: fp16 only
    assert averaged < 4.0 and abs(averaged - live) > 1e-3, (live, averaged)


def test_final_validation_is_not_repeated_when_prequant_eval_runs(twin_runs):
    """final_prequant scores the averaged weights; validating the live ones at the last step would be the same
    work again (validation at earlier steps still runs)."""
    for run in twin_runs:
        assert run.lines("step:3/6 val_loss:") and not run.lines("step:6/6 val_loss:")
        assert run.lines("final_prequant_exact")


@pytest.fixture(scope="module")
def quiet_runs(corpus, tmp_path_factory):
    """Seed 1's training without validation, evaluation or TTT: cold, and after 3 priming steps."""
    env = tiny_env(corpus, SEED=1, ITERATIONS=6, TTT_ENABLED=0, PREQUANT_EVAL=0, ROUNDTRIP_EVAL=0)
    cold = run_script(tmp_path_factory.mktemp("cold"), env, run_id="cold")
    primed = run_script(tmp_path_factory.mktemp("primed"), dict(env, WARMUP_STEPS="3"), run_id="primed")
    return cold, primed


def test_validation_during_training_leaves_training_unharmed(twin_runs, quiet_runs):
    """Periodic validation runs under inference mode; the training that follows must be the same."""
    one, _ = twin_runs
    quiet, _ = quiet_runs
    assert quiet.proc.returncode == 0, quiet.proc.stderr[-3000:]
    assert len(one.lines("step:3/6 val")) == 1 and not quiet.lines("step:3/6 val")
    assert train_losses(quiet) == train_losses(one)


def test_warmup_priming_restores_weights_optimizer_and_data(quiet_runs):
    cold, primed = quiet_runs
    assert primed.proc.returncode == 0, primed.proc.stderr[-3000:]
    assert primed.lines("warmup_priming: 3 steps")
    assert train_losses(primed) == train_losses(cold)


@pytest.mark.parametrize("cap, steps", [(1.05, 10), (1.25, 12)])
def test_training_stops_after_the_last_step_that_ends_inside_the_cap(tiny_args, cpu_runtime, monkeypatch, cap, steps):
    """Virtual clock: every step costs exactly 0.1 s. Under a cap of 1.05 s, 10 steps end at 1.0 s and an 11th would
    end past the cap: training stops after exactly 10, neither one step early nor one late (and 12 under 1.25 s)."""
    args = tiny_args(ITERATIONS=100_000, MAX_WALLCLOCK_SECONDS=cap, GPTQ_RESERVE_SECONDS=0, TRAIN_LOG_EVERY=1000)
    clock, step = VirtualClock(monkeypatch), train_gpt.Trainer.step

    def timed_step(self, *a):
        clock.now += 0.1
        return step(self, *a)

    monkeypatch.setattr(train_gpt.Trainer, "step", timed_step)
    lines = []
    val = train_gpt.load_validation_tokens(args)
    facts = train_gpt.Trainer(args, cpu_runtime, train_gpt.build_model(args), val, lines.append).run()
    assert facts == dict(step_stop=steps, wallclock_seconds=steps / 10, reserve=0.0)
    assert f"stopping_early: wallclock_cap train_time:{steps * 100}ms step:{steps}/100000" in lines


def test_the_shared_clock_is_the_slowest_rank_s_and_carries_any_rank_s_nan_or_stop(cpu_runtime, monkeypatch):
    """On several ranks each reads the slowest rank's training time, so the cap holds for every rank and all stop
    after the same step: the all-reduce must take the maximum (here another rank at 500 ms, this one at 100 ms).
    A loss gone non-finite, or a stop signal, on the other rank alone reaches this one at the same step."""
    other = {"ms": 500.0, "bad": 0.0, "signum": 0.0}  # the other rank: its clock, its loss's state, a signal

    def all_reduce(t, op=dist.ReduceOp.SUM, group=None):  # this rank's values and the other rank's, reduced by `op`
        theirs = torch.tensor([other["ms"], other["bad"], other["signum"]], dtype=t.dtype)
        t.copy_(torch.maximum(t, theirs) if op == dist.ReduceOp.MAX else torch.minimum(t, theirs)
                if op == dist.ReduceOp.MIN else t + theirs)

    monkeypatch.setattr(train_gpt.dist, "all_reduce", all_reduce)
    cpu_runtime.world = 2
    clock = train_gpt.SharedClock(cpu_runtime)
    assert clock.read(100.0, 1, torch.tensor(2.5)) == (500.0, 1, 2.5)
    assert clock.read(700.0, 2, torch.tensor(2.25)) == (700.0, 2, 2.25)
    other["bad"] = 2.0  # nan on the other rank only
    ms, step, loss = clock.read(800.0, 3, torch.tensor(2.0))
    assert (ms, step) == (800.0, 3) and math.isnan(loss)
    other.update(bad=0.0, signum=float(signal.SIGTERM))
    with pytest.raises(train_gpt.Stopped):
        clock.read(900.0, 4, torch.tensor(2.0))


def test_the_shared_clock_tells_an_infinite_loss_from_a_nan(cpu_runtime, monkeypatch):
    """The kind of non-finite loss survives the all-reduce: inf on the other rank reads inf here (the divergence line
    names it), nan reads nan, and this rank's own -inf reads inf too."""
    other = {"bad": 1.0}

    def all_reduce(t, op=dist.ReduceOp.SUM, group=None):
        t.copy_(torch.maximum(t, torch.tensor([0.0, other["bad"], 0.0], dtype=t.dtype)))

    monkeypatch.setattr(train_gpt.dist, "all_reduce", all_reduce)
    cpu_runtime.world = 2
    clock = train_gpt.SharedClock(cpu_runtime)
    assert clock.read(100.0, 1, torch.tensor(2.5)) == (100.0, 1, math.inf)
    other["bad"] = 0.0
    assert clock.read(200.0, 2, torch.tensor(-math.inf)) == (200.0, 2, math.inf)
    assert math.isnan(clock.read(300.0, 3, torch.tensor(math.nan))[2])
    assert clock.read(400.0, 4, torch.tensor(2.0)) == (400.0, 4, 2.0)


class LateClock(train_gpt.SharedClock):
    """The clock as it reads on CUDA: each read returns the step before this one (its loss has landed on the host)."""

    def read(self, elapsed_ms, step, loss):
        (step, loss), self.late = getattr(self, "late", (0, torch.zeros(()))), (step, loss.detach().clone())
        return super().read(elapsed_ms, step, loss)


@pytest.mark.parametrize("clock, bad_step, value", [("now", 3, math.inf), ("now", 4, math.nan), ("late", 4, math.nan),
                                                    ("late", 2, math.inf)])
def test_a_non_finite_loss_ends_training_at_its_step_the_last_one_included(tiny_args, cpu_runtime, monkeypatch, clock,
                                                                           bad_step, value):
    """Four steps; from step `bad_step` on the loss is inf or nan: training ends with Diverged naming that step and
    value, before any weights are averaged or exported, also when it is the last step and the clock reads a step late
    (as on CUDA, where the loop's own read of step 4 comes only after the loop)."""
    args = tiny_args(ITERATIONS=4, TRAIN_LOG_EVERY=1000)
    step = train_gpt.Trainer.step

    def step_going_bad(self, i, scale):
        ce = step(self, i, scale)
        return torch.full_like(ce, value) if i + 1 >= bad_step else ce

    monkeypatch.setattr(train_gpt.Trainer, "step", step_going_bad)
    if clock == "late":
        monkeypatch.setattr(train_gpt, "SharedClock", LateClock)
    lines = []
    trainer = train_gpt.Trainer(args, cpu_runtime, train_gpt.build_model(args), train_gpt.load_validation_tokens(args),
                                lines.append)
    with pytest.raises(train_gpt.Diverged, match=rf"^training diverged: train_loss {value} at step {bad_step}/4; ") \
            as stop:
        trainer.run()
    assert stop.value.exit_code == 5 and "the EMA weights are" in str(stop.value)
    assert not [line for line in lines if line.startswith("weight_avg:")]


def test_the_first_stop_signal_is_the_one_reported(monkeypatch):
    """torchrun forwards the signal it gets, so a rank may see SIGTERM and then SIGINT: the first one is reported,
    with its exit status 128 + 15."""
    monkeypatch.setattr(train_gpt.Stopped, "signum", 0)
    train_gpt.Stopped.check()  # nothing pending: no stop
    train_gpt.Stopped.note(signal.SIGTERM, None)
    train_gpt.Stopped.note(signal.SIGINT, None)
    with pytest.raises(train_gpt.Stopped, match="^SIGTERM$") as stop:
        train_gpt.Stopped.check()
    assert stop.value.exit_code == 143


@pytest.mark.parametrize("pending", [signal.SIGINT, 0])
def test_a_collective_broken_by_a_peer_that_stopped_ends_as_stopped(corpus, tmp_path, monkeypatch, capsys, pending):
    """A peer that was stopped by a signal and left breaks this rank's collective; with a stop signal pending here too
    (torchrun sends it to every rank), the run ends as stopped: the stop line and 128 + the signal. Without one, the
    lost peer is the error (exit 1)."""
    gone = "rank 0: all_reduce during training, step 3/12 failed: another rank has gone (Connection closed by peer)"

    def broken(args, rt, log):
        rt.phase = "training, step 3/12"
        monkeypatch.setattr(train_gpt.Stopped, "signum", pending)
        raise train_gpt.CollectiveFailed(gone, 1)

    monkeypatch.setattr(train_gpt, "run", broken)
    r = run_main(tmp_path, tiny_env(corpus, RUN_ID="peer"), monkeypatch, capsys)
    expected = ("error: stopped by SIGINT during training, step 3/12; no artifact was written (an earlier one is left "
                "as it was)") if pending else f"error: {gone}"
    assert (r.code, r.stderr.splitlines()) == ((130 if pending else 1), [expected])
    assert (tmp_path / "logs" / "peer.txt").read_text().splitlines()[-1] == expected


@pytest.mark.parametrize("timed_out", [True, False])
def test_a_rank_other_than_0_prints_only_its_own_timeout(corpus, tmp_path, monkeypatch, capsys, timed_out):
    """Rank 1 writes no log and prints nothing of its errors (rank 0 reports them), except a collective that timed out
    on it (exit 7): it may be the only rank that knows why the run ended."""
    message = ("rank 1: all_reduce during export failed: waited past COLLECTIVE_TIMEOUT_SECONDS=3" if timed_out else
               "rank 1: all_reduce during export failed: another rank has gone (Connection closed by peer)")

    def broken(args, rt, log):
        raise train_gpt.CollectiveFailed(message, None if timed_out else 1)

    monkeypatch.setattr(train_gpt, "run", broken)
    monkeypatch.setattr(train_gpt.Stopped, "signum", 0)
    r = run_main(tmp_path, tiny_env(corpus, RUN_ID="rank1", RANK=1), monkeypatch, capsys)
    assert r.code == (7 if timed_out else 1)
    assert r.stderr.splitlines() == ([f"error: {message}"] if timed_out else [])
    assert not (tmp_path / "logs").exists()


def test_the_size_estimate_counts_the_code_and_fits_exactly_at_the_cap(tiny_args):
    """The early estimate's bytes are what an RTN export of those weights writes, its total adds this script's size,
    and its verdict holds exactly at the cap and turns one byte below it."""
    model = realistic(train_gpt.build_model(tiny_args()), seed=1)

    def estimate(cap: int) -> str:
        lines = []
        with ThreadPoolExecutor(max_workers=1) as worker:
            train_gpt.estimate_size(7, model, cap, lines.append, worker).result()
        assert len(lines) == 1
        return lines[0]

    m = re.fullmatch(r"size_estimate: weights at step 7 would compress to (\d+) bytes, (\d+) with the code, cap "
                     r"1000000000 \(fits; int6 round-to-nearest\)", estimate(10**9))
    model_bytes, total = int(m[1]), int(m[2])
    export = train_gpt.build_artifact(model.state_dict(), SimpleNamespace(size_cap_bytes=10**9), log=lambda msg: None)
    assert model_bytes == len(export) and total == model_bytes + len((ROOT / "train_gpt.py").read_bytes())
    assert estimate(total).endswith(f"cap {total} (fits; int6 round-to-nearest)")
    assert estimate(total - 1).endswith(f"cap {total - 1} (over: the export will coarsen it to fit; int6 "
                                        f"round-to-nearest)")


def test_two_processes_stop_together_at_the_cap(corpus, tmp_path):
    """A real 3 s cap on two processes (the step count is pinned on a virtual clock above). The cap decision and the
    LR schedule use one clock (the slowest rank's): a rank stopping alone would leave the other waiting in a
    collective, so a clean exit with one stop line is the check; the run ends inside the cap, no more than two steps
    (+0.5 s) before it, and a warmdown longer than the run turns late QAT on at once."""
    env = tiny_env(corpus, ITERATIONS=100_000, MAX_WALLCLOCK_SECONDS=3, TRAIN_LOG_EVERY=1000, TTT_ENABLED=0,
                   QUANT="rtn", WARMDOWN_ITERS=100_000, WARMDOWN_FRAC="auto", LATE_QAT_THRESHOLD=0.15)
    run = run_script(tmp_path, env, nproc=2, run_id="cap2", timeout=240)
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    stop = run.lines("stopping_early: wallclock_cap")
    assert len(stop) == 1
    stopped_at = int(stop[0].split("step:")[1].split("/")[0])
    train_ms = float(stop[0].split("train_time:")[1].split("ms")[0])
    step_ms = train_ms / stopped_at
    assert 3000 - 2 * step_ms - 500 <= train_ms <= 3000 + step_ms, (train_ms, step_ms)
    qat = run.lines("late_qat: on at step:")
    assert len(qat) == 1 and int(qat[0].split("step:")[1].split()[0]) <= 1, qat  # once the first step is timed
    info = json.loads((run.cwd / "logs" / "cap2.submission.json").read_text())
    assert info["step_stop"] == stopped_at and info["wallclock_seconds"] == pytest.approx(train_ms / 1000, abs=0.05)
    assert run.lines("final_prequant_exact") and not run.lines(f"step:{stopped_at}/100000 val_loss:")
    assert run.lines("final_int6_lzma_roundtrip_exact")


def test_calibration_past_the_budget_is_flagged(corpus, tmp_path):
    """With no time reserved, training fills the cap and GPTQ calibration lands past it: the log says so."""
    env = tiny_env(corpus, ITERATIONS=100_000, MAX_WALLCLOCK_SECONDS=2, TRAIN_LOG_EVERY=1000, TTT_ENABLED=0,
                   QUANT="gptq", GPTQ_RESERVE_SECONDS=0, GPTQ_CALIB_BATCHES=50, PREQUANT_EVAL=0)
    run = run_script(tmp_path, env, run_id="overrun")
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    assert len(run.lines("warning: training + GPTQ calibration took")) == 1
    # the default reserve is measured before the clock starts: one batch timed, scaled to the batches and padded
    auto = run_script(tmp_path, dict(env, GPTQ_RESERVE_SECONDS=""), run_id="auto")
    assert auto.proc.returncode == 0 and not auto.lines("warning:"), auto.log[-2000:]
    reserve = float(re.search(r"^gptq_reserve: auto ([0-9.]+)s", auto.log, re.M).group(1))
    calibration = auto.lines("gptq_calibration: 50 batches/rank in")[0]
    assert reserve > 1.0 and calibration.endswith(f"(reserved {reserve:.2f}s)")
    train_s = auto.value("stopping_early: wallclock_cap", "train_time") / 1000
    assert train_s <= max(2.0 - reserve, 0.0) + 0.5, (train_s, reserve)


def test_rebalanced_model_runs_end_to_end_at_4096_bytes(tmp_path):
    """TRAIN_SEQ_LEN=4095 with every compute-allocation knob on, at the default patch of 8 (the tiny runs use 4):
    training, the artifact, sliding windows with a stride of 512 and TTT over chunks of two windows, each scoring
    every validation byte once; the log states the decoder attention's kernel and counts the n-gram embeddings'
    FLOPs."""
    from conftest import write_corpus
    corpus = write_corpus(tmp_path / "corpus", train_docs=600, val_docs=120)
    env = tiny_env(corpus, TRAIN_SEQ_LEN=4095, PATCH_SIZE=8, TRAIN_BATCH_TOKENS=32760, VAL_BATCH_SIZE=32760,
                   ITERATIONS=3, VAL_SLIDING_STRIDE=512, SLIDING_EVAL=1, TTT_CHUNK_TOKENS=8192, DECODER_DIM=24,
                   DECODER_LAYERS=2, DECODER_WINDOW=64, LATENT_PER_SLOT=1, LATENT_INJECT_LAYERS=2, LATENT_NORM=1,
                   NGRAM_BUCKETS=97, SMEAR_GATE=1)
    run = run_script(tmp_path / "run", env, run_id="long")
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    assert run.lines("decoder_attention: window:64 kernel:sdpa (blocks of the window, masked)")
    assert "ngram_embeddings:" in run.lines("flops_train_components:")[0]
    targets = train_gpt.load_data_shard(corpus / "fineweb_val_000000.bin").size - 1
    for label in ("sliding", "ttt"):
        assert run.lines(f"{label}_targets_scored:{targets} expected:{targets} ok"), label
        assert run.value(f"final_{label}_exact", "val_bpb") < 9.0


# logged in the run below by commit 5d1224c (the reference, before issue 9) and by 59fc1c3 (the issue-9 default,
# before issue 10): step losses, then pre-quant and round-trip bpb
GOLDEN = {
    "reference": ([5.5607, 5.1366, 4.5829, 3.9854, 3.3212, 2.8084, 2.3895, 2.1161, 1.9485, 1.8042, 1.7250, 1.6995],
                  3.86624076, 3.86623237),
    "issue 9": ([5.5607, 5.1364, 4.5896, 3.9715, 3.2834, 2.7455, 2.3032, 2.0219, 1.8383, 1.6583, 1.5532, 1.4800],
                3.74947271, 3.74947645),
}


@pytest.mark.parametrize("before", GOLDEN)
def test_knobs_off_reproduce_the_earlier_training(corpus, tmp_path, before):
    """Model, optimizer and schedule with every knob added since off (REFERENCE), or the recipe's knobs only
    (REFERENCE_RECIPE): the run logs what the earlier commit logged (every step's train loss to its 4 printed
    decimals; the bpb within what CPU kernels vary by, seen equal)."""
    off = REFERENCE if before == "reference" else REFERENCE_RECIPE
    run = run_script(tmp_path, tiny_env(corpus, TTT_ENABLED=0, QUANT="rtn", **off), run_id="off")
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    losses, prequant, roundtrip = GOLDEN[before]
    assert train_losses(run) == dict(enumerate(losses, start=1))
    assert run.value("final_prequant_exact", "val_bpb") == pytest.approx(prequant, abs=2e-4)
    assert run.value("final_int6_lzma_roundtrip_exact", "val_bpb") == pytest.approx(roundtrip, abs=2e-4)


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_diverged_run_stops_within_two_steps_and_exports_nothing(diverged_run, corpus, tmp_path, nproc):
    """Every learning rate at 1e8 (the issue's case: the loss was nan from step 4 on, yet the run trained to the end
    and wrote "val_bpb": NaN): the run stops within 2 steps of the first non-finite loss, every rank at the same step,
    with one line naming the step, the value and the learning rates; exit 5, no artifact replaced, no submission."""
    if nproc == 1:
        run, before = diverged_run
    else:
        before = earlier_artifact(tmp_path)
        run = run_script(tmp_path, tiny_env(corpus, **DIVERGING_LRS), nproc=2, run_id="diverged", timeout=120)
    line = one_error_line(run)
    losses = train_losses(run)
    first = min(step for step, loss in losses.items() if not math.isfinite(loss))
    assert losses[1] == pytest.approx(math.log(260), abs=0.05) and max(losses) <= first + 2 < 12, losses
    named = int(re.search(r"^error: training diverged: train_loss (?:nan|inf) at step (\d+)/12; ", line).group(1))
    assert first <= named <= max(losses), (first, named, losses)
    assert "lower the learning rates MATRIX_LR=1e+08 EMBED_LR=1e+08 HEAD_LR=1e+08 SCALAR_LR=1e+08" in line
    assert "; the EMA weights are " in line and line.endswith("; nothing was exported")
    if nproc == 1:
        assert run.proc.returncode == 5
    else:  # torchrun exits 1 and lists the ranks that ended before it stopped the others: status 5, each
        assert run.proc.returncode != 0 and set(re.findall(r"^ *exitcode *: (\d+)", run.proc.stderr, re.M)) == {"5"}
    assert (run.cwd / train_gpt.ARTIFACT_NAME).read_bytes() == before and not leftovers(run.cwd)
    assert not (run.cwd / "logs" / "diverged.submission.json").exists()
    assert not run.lines("final_") and not run.lines("Serialized model")


def test_sigterm_during_training_stops_the_run_within_seconds(corpus, tmp_path):
    """SIGTERM between steps: the step ends, the run stops with one line naming the phase and step, exit 143."""
    before = earlier_artifact(tmp_path)
    run, waited = signal_run(tmp_path, tiny_env(corpus, ITERATIONS=100_000), "step:2/")
    line = one_error_line(run)
    assert run.proc.returncode == 128 + signal.SIGTERM and waited < 10, (run.proc.returncode, waited)
    step = int(re.fullmatch(r"error: stopped by SIGTERM during training, step (\d+)/100000; no artifact was written "
                            r"\(an earlier one is left as it was\)", line).group(1))
    assert step == max(train_losses(run)) >= 2
    assert (tmp_path / train_gpt.ARTIFACT_NAME).read_bytes() == before and not leftovers(tmp_path)


STALL = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import train_gpt

step = train_gpt.Trainer.step


def stalled_step(self, i, scale):  # rank 1 stalls before its third step; rank 0 waits for it in a collective
    if i == 2 and self.rt.rank == 1:
        time.sleep({seconds})
    return step(self, i, scale)


train_gpt.Trainer.step = stalled_step
for stop in (signal.SIGTERM, signal.SIGINT):
    signal.signal(stop, train_gpt.Stopped.note)
sys.exit(train_gpt.main())
"""


def test_a_stalled_rank_ends_the_run_at_the_collective_timeout(corpus, tmp_path):
    """A rank that stalls inside the training loop: the other waits COLLECTIVE_TIMEOUT_SECONDS in its all-reduce,
    then ends the run with one line naming the collective, the phase and the step (exit 7), within the timeout plus
    torchrun's teardown, not after torch's 30-minute gloo default."""
    wrapper = tmp_path / "stall.py"
    wrapper.write_text(STALL.format(root=str(ROOT), seconds=4))
    t = time.monotonic()
    run = run_script(tmp_path / "run", tiny_env(corpus, COLLECTIVE_TIMEOUT_SECONDS=3), nproc=2, run_id="stall",
                     timeout=120, script=wrapper)
    elapsed = time.monotonic() - t
    line = one_error_line(run)
    assert line == ("error: rank 0: all_reduce during training, step 3/12 failed: waited past "
                    "COLLECTIVE_TIMEOUT_SECONDS=3")
    assert run.proc.returncode != 0 and re.search(r"exitcode\s*: 7 ", run.proc.stderr), run.proc.stderr[-2000:]
    assert elapsed < 3 + 30 + 20, elapsed  # the timeout, torchrun's 30 s grace for a rank it stops, start-up
    assert max(train_losses(run)) == 2 and not leftovers(run.cwd)
