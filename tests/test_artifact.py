"""Artifact: int6 quantisation (RTN, GPTQ), LZMA round trip, reloading, size accounting and the cap; an export that
cannot finish (a signal, a full disk, a directory in the way) leaves an earlier artifact as it was; late QAT;
EMA/SWA weight averaging."""
import errno
import io
import json
import lzma
import math
import os
import re
import signal
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt
from conftest import (SCRIPT, TINY, earlier_artifact, leftovers, one_error_line, randomize, realistic, run_main,
                      run_script, signal_run, tiny_env)

# MODEL_DIM=192 makes the MLPs (384x192), the predictor's first layer and the patch projection (192x768) larger
# than SMALL_TENSOR_MAX, so a small model has int6 tensors, fp16 tensors, fp32 control tensors and a large
# training-only projector layer (projector.fc, 384x192) all at once.
WIDE = dict(MODEL_DIM=192)
WIDE_INT6 = {"patch_proj.weight", "predictor.fc.weight", "blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight",
             "blocks.1.mlp.fc.weight", "blocks.1.mlp.proj.weight", "dec_blocks.0.mlp.fc.weight",
             "dec_blocks.0.mlp.proj.weight"}
# the n-gram tables (4096 x MODEL_DIM/4) are large enough for int6 too: stored like matrices, but not linear
# layers, so no Hessian (round-to-nearest) and no QAT
TABLES = {"patch_ngrams.table.weight", "dec_ngrams.table.weight"}
CPU = torch.device("cpu")


def row_error_bound(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per row, the most round-to-nearest with clamping to [-31 s, 31 s] can be off: s/2 inside the clip,
    |w| - 31 s beyond it."""
    s = scales.float()
    return torch.maximum(s / 2, w.abs().amax(dim=1) - 31 * s)


def heavy_tailed(rows: int, cols: int, seed: int, df: int = 3) -> torch.Tensor:
    """Student-t rows (df 3): a long tail, so clipping its last few values below the row maximum pays off."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, cols, generator=g)
    chi2 = torch.randn(df, rows, cols, generator=g).square().sum(0)
    return z / (chi2 / df).sqrt()


# -----------------------------------------------------------------------------------------------------------------
# Round to nearest
# -----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gaussian", "heavy_tailed", "uniform"])
def test_rtn_values_in_range_and_error_bounded_per_row(kind):
    g = torch.Generator().manual_seed(3)
    w = {"gaussian": lambda: torch.randn(48, 700, generator=g) * 0.02,
         "heavy_tailed": lambda: heavy_tailed(48, 700, 3) * 0.02,
         "uniform": lambda: (torch.rand(48, 700, generator=g) - 0.5) * 0.1}[kind]()
    q, scales = train_gpt.quantize_rtn(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scales.dtype == torch.float16 and scales.shape == (48,)
    assert int(q.abs().max()) <= 31
    assert torch.isfinite(scales.float()).all() and (scales.float() > 0).all()
    deq = train_gpt.dequantize(q, scales)
    assert deq.dtype == torch.float32
    assert torch.equal(deq, q.float() * scales.float()[:, None])
    row_err = (deq - w).abs().amax(dim=1)
    assert (row_err <= row_error_bound(w, scales) * (1 + 1e-5) + 1e-9).all()
    # every row uses the grid's extremes: no row's scale is needlessly coarse
    assert (q.abs().amax(dim=1) >= 30).all()


def brute_force_rtn(w: torch.Tensor, qmax: int = 31) -> tuple[int, list[float]]:
    """Independent reference in numpy (float64): per candidate quantile, per-row fp16 scales clip/qmax (1 for a
    zero clip), round to nearest, clamp to [-qmax, qmax]; returns the index of least summed squared error."""
    a = w.double().numpy()
    errors = []
    for quantile in train_gpt.CLIP_QUANTILES:
        clip = np.quantile(np.abs(a), quantile, axis=1)  # linear interpolation, like torch.quantile
        s = np.where(clip > 0, clip / qmax, 1.0).astype(np.float16).astype(np.float64)
        q = np.clip(np.round(a / s[:, None]), -qmax, qmax)
        errors.append(float(((q * s[:, None] - a) ** 2).sum()))
    return int(np.argmin(errors)), errors


def on_grid_with_one_max(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Multiples of 2^-6 in [-20, 20] steps, plus one value of exactly 31 steps per row: the row maximum's grid
    reproduces the matrix exactly, every clipping quantile does not."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(-20, 21, (rows, cols), generator=g).float()
    k[torch.arange(rows), torch.randint(0, cols, (rows,), generator=g)] = 31.0
    return k * 2.0 ** -6


@pytest.mark.parametrize("kind, expect_clipped", [("student_t", True), ("gaussian", True), ("grid", False)])
def test_rtn_picks_the_clip_quantile_of_least_mse(kind, expect_clipped):
    w = {"student_t": lambda: heavy_tailed(40, 1000, 11),
         "gaussian": lambda: torch.randn(40, 1000, generator=torch.Generator().manual_seed(11)),
         "grid": lambda: on_grid_with_one_max(40, 1000, 11)}[kind]()
    best, errors = brute_force_rtn(w)
    ranked = sorted(errors)
    assert ranked[1] > ranked[0] * (1 + 1e-3), "test precondition: a clear winner among the candidates"
    # the cases are chosen so that both a clipping quantile and the plain row maximum are exercised
    assert (train_gpt.CLIP_QUANTILES[best] < 1.0) == expect_clipped
    q, scales = train_gpt.quantize_rtn(w)
    expected_scales = [train_gpt.row_scales(w, quantile) for quantile in train_gpt.CLIP_QUANTILES]
    chosen = [i for i, s in enumerate(expected_scales) if torch.equal(s, scales)]
    assert chosen == [best], f"picked quantile(s) {chosen}, least-MSE is {best} (errors {errors})"
    # the scales agree with the numpy reference's to fp16 rounding, and the error is the minimum
    clip = np.quantile(np.abs(w.double().numpy()), train_gpt.CLIP_QUANTILES[best], axis=1)
    np.testing.assert_allclose(scales.float().numpy(), clip / 31, rtol=1e-3)
    err = (train_gpt.dequantize(q, scales).double() - w.double()).square().sum().item()
    assert err == pytest.approx(errors[best], rel=1e-4)
    assert err <= min(errors) * (1 + 1e-4)


def test_all_zero_rows_and_tensors_quantise_without_nan():
    w = torch.randn(8, 300, generator=torch.Generator().manual_seed(0))
    w[2] = 0.0
    w[5] = 0.0
    for matrix in (w, torch.zeros(4, 300)):
        q, scales = train_gpt.quantize_rtn(matrix)
        deq = train_gpt.dequantize(q, scales)
        assert torch.isfinite(scales.float()).all() and torch.isfinite(deq).all()
        zero_rows = (matrix == 0).all(dim=1)
        assert (q[zero_rows] == 0).all() and (deq[zero_rows] == 0).all()
        assert (scales.float()[zero_rows] == 1.0).all()
        # GPTQ too, with a Hessian that has a dead input (a column never active)
        x = torch.randn(200, 300, generator=torch.Generator().manual_seed(1))
        x[:, 7] = 0.0
        qg, sg = train_gpt.quantize_gptq(matrix, x.T @ x / 200)
        deq_g = train_gpt.dequantize(qg, sg)
        assert torch.isfinite(deq_g).all() and (qg[zero_rows] == 0).all() and int(qg.abs().max()) <= 31
        assert (qg[:, 7] == 0).all()  # a dead input's weight does not matter: stored as 0


def test_fake_quantize_int6_matches_per_row_amax_grid():
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(2))
    w[3] = 0.0
    fq = train_gpt.fake_quantize_int6(w)
    assert torch.isfinite(fq).all() and (fq[3] == 0).all()
    step = w.abs().amax(dim=1, keepdim=True) / 31
    live = step[:, 0] > 0
    levels = fq[live] / step[live]
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.abs().max() <= 31 + 1e-4
    assert ((fq - w).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()
    assert torch.allclose(fq.abs().amax(dim=1), w.abs().amax(dim=1))  # the row maximum is on the grid


# -----------------------------------------------------------------------------------------------------------------
# GPTQ
# -----------------------------------------------------------------------------------------------------------------


def layer_output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> float:
    return (x @ (w - train_gpt.dequantize(q, scales)).T).double().square().sum().item()


def reference_gptq(w: torch.Tensor, h: torch.Tensor, scales: torch.Tensor, damp: float = 0.01,
                   qmax: int = 31) -> torch.Tensor:
    """Textbook GPTQ in float64, one column at a time with the explicit inverse-Hessian downdate (no Cholesky, no
    blocks): same column order (largest Hessian diagonal first), dampening and dead-input handling."""
    w, h = w.double().clone(), h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diag(h).mean() * torch.eye(h.size(0), dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    s = scales.double()
    q = torch.zeros_like(w)
    for j in range(w.size(1)):
        q[:, j] = torch.clamp(torch.round(w[:, j] / s), -qmax, qmax)
        err = (w[:, j] - q[:, j] * s) / hinv[j, j]
        w[:, j + 1:] -= err[:, None] * hinv[j, j + 1:][None, :]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return q[:, torch.argsort(order)]


def test_gptq_output_error_on_correlated_inputs_is_below_rtn():
    g = torch.Generator().manual_seed(5)
    mixing = torch.randn(256, 256, generator=g) * torch.logspace(0, -2, 256)[:, None]
    x = torch.randn(1024, 256, generator=g) @ mixing  # strongly correlated features
    x[:, 200] = 0.0  # one dead input
    w = torch.randn(64, 256, generator=g) * 0.05
    hessian = x.T @ x / x.size(0)
    q_rtn, s_rtn = train_gpt.quantize_rtn(w)
    q_gptq, s_gptq = train_gpt.quantize_gptq(w, hessian)
    # the blocked Cholesky implementation agrees with the textbook algorithm (float rounding may flip a few)
    q_ref = reference_gptq(w, hessian, s_gptq)
    assert (q_gptq.double() == q_ref).double().mean() > 0.99
    assert layer_output_error(x, w, q_gptq, s_gptq) == pytest.approx(layer_output_error(x, w, q_ref, s_gptq),
                                                                      rel=0.02)
    assert (q_gptq[:, 200] == 0).all()
    assert q_gptq.dtype == torch.int8 and int(q_gptq.abs().max()) <= 31
    assert torch.equal(s_gptq, s_rtn)  # GPTQ keeps RTN's scales and changes the rounding only
    assert not torch.equal(q_gptq, q_rtn)
    err_rtn, err_gptq = layer_output_error(x, w, q_rtn, s_rtn), layer_output_error(x, w, q_gptq, s_gptq)
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def correlated_inputs(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) @ (torch.randn(cols, cols, generator=g) *
                                                   torch.logspace(0, -2, cols)[:, None])


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_every_width_of_the_ladder_in_both_quantisers(bits):
    """quantize_matrix at each width rate control uses: round to nearest keeps the least-MSE clip on that width's
    grid (numpy reference), GPTQ is the textbook algorithm on that grid with RTN's scales; both fill the grid
    [-qmax, qmax] and never leave it, and GPTQ's outputs move less than RTN's."""
    qmax = 2 ** (bits - 1) - 1
    w = heavy_tailed(24, 256, bits) * 0.02
    best, errors = brute_force_rtn(w, qmax)
    rtn = train_gpt.quantize_matrix(w, None, bits)
    assert rtn["q"].dtype == torch.int8 and int(rtn["q"].abs().max()) == qmax
    err = (train_gpt.dequantize(rtn["q"], rtn["scale"]).double() - w.double()).square().sum().item()
    assert err <= min(errors) * (1 + 1e-4), (err, errors)
    assert torch.equal(rtn["scale"], train_gpt.row_scales(w, train_gpt.CLIP_QUANTILES[best], qmax)) or \
        sorted(errors)[1] < min(errors) * (1 + 1e-4)  # a near tie may pick the other candidate
    x = correlated_inputs(512, 256, bits)
    hessian = x.T @ x / x.size(0)
    gptq = train_gpt.quantize_matrix(w, hessian, bits)
    assert torch.equal(gptq["scale"], rtn["scale"]) and int(gptq["q"].abs().max()) <= qmax
    assert (gptq["q"].double() == reference_gptq(w, hessian, gptq["scale"], qmax=qmax)).double().mean() > 0.99
    assert layer_output_error(x, w, gptq["q"], gptq["scale"]) < layer_output_error(x, w, rtn["q"], rtn["scale"])


def test_q_k_and_v_share_one_hessian_equal_to_their_own_inputs(tiny_args):
    """Wide enough that q, k and v are int6 (288 x 288, two KV heads): one Hessian serves the three, and it is
    the X^T X / rows of what k and v themselves read."""
    args = tiny_args(MODEL_DIM=288, NUM_HEADS=2, NUM_KV_HEADS=2, GPTQ_CALIB_BATCHES=2)
    model = randomize(train_gpt.build_model(args), std=0.05)
    modules = dict(model.named_modules())
    names = [f"{stack}.{i}.attn.{p}.weight" for stack, n in (("blocks", 2), ("dec_blocks", 1)) for i in range(n)
             for p in "qkv"]
    seen = {name: [] for name in names}
    handles = [modules[name.removesuffix(".weight")].register_forward_hook(
        lambda m, inputs, out, name=name: seen[name].append(inputs[0].detach().reshape(-1, inputs[0].size(-1))))
        for name in names]
    try:
        hessians = train_gpt.collect_hessians(model, train_gpt.DistributedTokenLoader(args, 0, CPU), args,
                                              train_gpt.Runtime(args))
    finally:
        for h in handles:
            h.remove()
    for name in names:
        x = torch.cat(seen[name]).float()
        torch.testing.assert_close(hessians[name], x.T @ x / x.size(0), rtol=1e-4, atol=1e-6)
        if name.endswith((".k.weight", ".v.weight")):
            assert hessians[name] is hessians[name[:-len("k.weight")] + "q.weight"], name
    assert not torch.equal(hessians["blocks.0.attn.q.weight"], hessians["blocks.1.attn.q.weight"])


def test_hessians_on_two_ranks_are_the_mean_over_both_ranks_rows(tiny_args, monkeypatch):
    """Two ranks whose calibration batches hold the same bytes (simulated: the all-reduce adds an identical rank's
    values to this one's): X^T X summed over both ranks, over the rows of both, is this rank's own X^T X / rows. A
    sum or a row count left unreduced would halve or double it."""
    args = tiny_args(GPTQ_CALIB_BATCHES=2, **WIDE)
    model = randomize(train_gpt.build_model(args), std=0.05)
    seen = []
    handle = model.patch_proj.register_forward_hook(
        lambda m, inputs, out: seen.append(inputs[0].detach().reshape(-1, inputs[0].size(-1))))

    def all_reduce(t, op=train_gpt.dist.ReduceOp.SUM, group=None):  # the other rank holds what this one holds
        if op == train_gpt.dist.ReduceOp.SUM:
            t.mul_(2)

    monkeypatch.setattr(train_gpt.dist, "all_reduce", all_reduce)
    rt = train_gpt.Runtime(args)
    rt.world = 2
    try:
        hessians = train_gpt.collect_hessians(model, train_gpt.DistributedTokenLoader(args, 0, CPU), args, rt)
    finally:
        handle.remove()
    x = torch.cat(seen).float()
    assert x.size(0) == 2 * 2 * args.window // args.patch_size  # 2 batches of 2 windows, one row per patch
    torch.testing.assert_close(hessians["patch_proj.weight"], x.T @ x / x.size(0), rtol=1e-4, atol=1e-6)


def test_gptq_on_the_models_calibration_batches_beats_rtn(tiny_args):
    """collect_hessians on training micro-batches gives X^T X / rows of each int6 layer's inputs; GPTQ with that
    Hessian moves the layer's outputs on those batches no more than round-to-nearest does."""
    args = tiny_args(GPTQ_CALIB_BATCHES=3, **WIDE)
    rt = train_gpt.Runtime(args)
    model = randomize(train_gpt.build_model(args), std=0.05)
    seen = {name: [] for name in WIDE_INT6}
    modules = dict(model.named_modules())
    handles = [modules[name.removesuffix(".weight")].register_forward_hook(
        lambda m, inputs, out, name=name: seen[name].append(inputs[0].detach().reshape(-1, inputs[0].size(-1))))
        for name in WIDE_INT6]
    try:
        hessians = train_gpt.collect_hessians(model, train_gpt.DistributedTokenLoader(args, 0, CPU), args, rt)
    finally:
        for h in handles:
            h.remove()
    assert set(hessians) == WIDE_INT6  # projector.fc is large too, but training-only: no Hessian
    for name in sorted(WIDE_INT6):
        x = torch.cat(seen[name]).float()
        assert torch.allclose(hessians[name], x.T @ x / x.size(0), rtol=1e-4, atol=1e-6), name
        w = model.state_dict()[name]
        err_rtn = layer_output_error(x, w, *train_gpt.quantize_rtn(w))
        err_gptq = layer_output_error(x, w, *train_gpt.quantize_gptq(w, hessians[name]))
        assert err_gptq <= err_rtn, f"{name}: GPTQ output error {err_gptq} > RTN's {err_rtn}"
    # quantize_state uses GPTQ where a Hessian is given and RTN elsewhere
    state = {k: model.state_dict()[k] for k in ("patch_proj.weight", "predictor.fc.weight")}
    qstate = train_gpt.quantize_state(state, {"patch_proj.weight": hessians["patch_proj.weight"]})
    w = model.patch_proj.weight
    assert torch.equal(qstate["patch_proj.weight"]["q"], train_gpt.quantize_gptq(w, hessians["patch_proj.weight"])[0])
    assert torch.equal(qstate["predictor.fc.weight"]["q"], train_gpt.quantize_rtn(model.predictor.fc.weight)[0])


# -----------------------------------------------------------------------------------------------------------------
# The artifact's layout, LZMA round trip and reloading
# -----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def wide_model(tiny_args):
    args = tiny_args(**WIDE)
    return args, randomize(train_gpt.build_model(args), seed=4, std=0.05)


def test_quantize_state_layout(wide_model):
    args, model = wide_model
    state = model.state_dict()
    qstate = train_gpt.quantize_state(state)
    stored = {k for k in state if not k.startswith("projector.")}
    assert any(k.startswith("projector.") for k in state) and state["projector.fc.weight"].numel() > 65_536
    assert set(qstate) == stored  # training-only tensors left out, everything else kept
    int6 = {k for k, v in qstate.items() if isinstance(v, dict)}
    assert int6 == WIDE_INT6 | TABLES
    for name, v in qstate.items():
        t = state[name]
        if name in int6:
            assert set(v) == {"q", "scale"}
            assert v["q"].dtype == torch.int8 and v["q"].shape == t.shape
            assert int(v["q"].min()) >= -31 and int(v["q"].max()) <= 31
            assert v["scale"].dtype == torch.float16 and v["scale"].shape == (t.shape[0],)
            assert (v["scale"].float() > 0).all() and torch.isfinite(v["scale"].float()).all()
            assert t.numel() > 65_536 and t.ndim == 2
        elif any(c in name for c in ("attn_scale", "mlp_scale", "resid_mix", "q_gain")):
            assert v.dtype == torch.float32 and torch.equal(v, t), name
        else:
            assert v.dtype == torch.float16 and torch.equal(v, t.half()), name
            assert t.numel() <= 65_536 or t.ndim != 2, name
    controls = [k for k in qstate if re.search(r"(attn_scale|mlp_scale|resid_mix|q_gain)$", k)]
    assert len(controls) == 3 * 4  # two encoder blocks and one decoder block, four control tensors each


@pytest.fixture
def realistic_wide(tiny_args):
    args = tiny_args(**WIDE)
    return args, realistic(train_gpt.build_model(args), seed=4)


def test_round_trip_weights_are_within_half_a_step_of_the_originals(realistic_wide, tmp_path):
    """The artifact file decoded as the README tells an independent decoder (xz, torch.load, q * scale per row)
    holds what quantize_state made, and load_artifact's model holds exactly those weights: int6 matrices within
    half a quantisation step of the originals per row (or the clipped excess), fp16 tensors within fp16 rounding,
    control tensors exact."""
    args, model = realistic_wide
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    qstate = train_gpt.quantize_state(model.state_dict())
    blob = train_gpt.serialize_artifact(qstate)
    assert blob[:6] == b"\xfd7zXZ\x00"  # an .xz stream
    decoded = torch.load(io.BytesIO(lzma.decompress(blob)), weights_only=True)
    assert set(decoded) == set(qstate) == {k for k in original if not k.startswith("projector.")}
    for name, v in qstate.items():
        if isinstance(v, dict):
            assert torch.equal(decoded[name]["q"], v["q"]) and torch.equal(decoded[name]["scale"], v["scale"])
        else:
            assert decoded[name].dtype == v.dtype and torch.equal(decoded[name], v), name
    path = tmp_path / "a.ptz"
    path.write_bytes(blob)
    got = train_gpt.load_artifact(path, args).state_dict()
    assert {k for k, v in decoded.items() if isinstance(v, dict)} == WIDE_INT6 | TABLES
    for name, v in decoded.items():
        w = original[name].double()
        assert got[name].dtype == torch.float32, name
        if isinstance(v, dict):
            s = v["scale"].double()
            assert torch.equal(got[name].double(), v["q"].double() * s[:, None]), f"{name}: not q * scale"
            bound = torch.maximum(s / 2, w.abs().amax(dim=1) - 31 * s) * (1 + 1e-6)
            err = (got[name].double() - w).abs().amax(dim=1)
            assert (err <= bound).all(), f"{name}: a row is off by {float((err / bound).max()):.2f} x its bound"
            assert (s < w.abs().amax(dim=1) / 20).all()  # a real int6 grid: no row stored with a coarse scale
        elif re.search(r"(attn_scale|mlp_scale|resid_mix|q_gain)$", name):
            assert torch.equal(got[name], original[name]), name
        else:
            assert ((got[name].double() - w).abs() <= w.abs() * 2.0 ** -11 + 2.0 ** -24).all(), name


def test_round_trip_bpb_stays_within_a_small_gap_of_the_live_weights(realistic_wide, corpus, tmp_path):
    """The quantised model (8 int6 matrices here) scores the validation split within 0.002 bpb of the live
    weights (seen: 4e-4), with RTN and with GPTQ."""
    args, model = realistic_wide
    rt = train_gpt.Runtime(args)
    val = train_gpt.load_validation_tokens(args)
    live = train_gpt.evaluate_standard(model, val, args, rt).bpb
    hessians = train_gpt.collect_hessians(model, train_gpt.DistributedTokenLoader(args, 0, CPU), args, rt)
    for label, h in (("rtn", None), ("gptq", hessians)):
        path = tmp_path / f"{label}.ptz"
        path.write_bytes(train_gpt.serialize_artifact(train_gpt.quantize_state(model.state_dict(), h)))
        reloaded = train_gpt.evaluate_standard(train_gpt.load_artifact(path, args), val, args, rt).bpb
        assert abs(reloaded - live) < 0.002, (label, live, reloaded)


def test_load_artifact_with_other_model_shape_is_a_config_error(tiny_args, tmp_path):
    """An artifact written for another model configuration (EVAL_ONLY with other knobs) is a ConfigError that
    says so, whether a tensor is missing or has another shape (torch's 'size mismatch' traceback never shows)."""
    model = train_gpt.build_model(tiny_args())
    path = tmp_path / "a.ptz"
    path.write_bytes(train_gpt.serialize_artifact(train_gpt.quantize_state(model.state_dict())))
    with pytest.raises(train_gpt.ConfigError):  # a missing block: already a ConfigError
        train_gpt.load_artifact(path, tiny_args(NUM_LAYERS=3))
    with pytest.raises(train_gpt.ConfigError):  # other widths
        train_gpt.load_artifact(path, tiny_args(MODEL_DIM=64))


def xz(payload) -> bytes:
    """An .xz file holding `payload` as torch.save writes it (bytes are compressed as they are)."""
    if not isinstance(payload, bytes):
        buf = io.BytesIO()
        torch.save(payload, buf)
        payload = buf.getvalue()
    return lzma.compress(payload, format=lzma.FORMAT_XZ)


# id, file content (a function of a real tiny artifact), text the one error line must hold
BAD_ARTIFACTS = [
    ("empty-file", lambda real: b"", "empty"),
    ("one-byte-of-garbage", lambda real: b"x", "not an xz/lzma artifact"),
    ("random-bytes", lambda real: bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
     "not an xz/lzma artifact"),
    ("truncated-artifact", lambda real: real[:len(real) // 2], "truncated"),
    ("xz-of-text", lambda real: xz(b"hello, not a torch file"), "not a torch.save payload"),
    ("xz-of-a-list", lambda real: xz([torch.zeros(3)]), "found list"),
    ("xz-of-an-empty-dict", lambda real: xz({}), "non-empty dict"),
    ("xz-of-a-state-dict", lambda real: xz(train_gpt.build_model(train_gpt.Hyperparameters()).state_dict()),
     "state dict"),
    ("xz-of-numbers", lambda real: xz({"head.weight": 3}), "head.weight"),
    ("xz-of-a-bad-int6-entry", lambda real: xz({"patch_proj.weight": {"q": torch.zeros(4, 4), "scale": 1}}),
     "patch_proj.weight"),
]


def write_bad_artifact(tmp_path, content) -> str:
    path = tmp_path / "bad.ptz"
    path.write_bytes(content(train_gpt.serialize_artifact(train_gpt.quantize_state(
        train_gpt.build_model(train_gpt.Hyperparameters()).state_dict()))))
    return str(path)


def assert_one_eval_only_error(code: int, stdout: str, stderr: str, cwd, path: str, reason: str):
    assert code == 2, (code, stderr[-2000:])
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: EVAL_ONLY={path}: "), stderr
    assert reason in lines[0], lines[0]
    assert "Traceback" not in stderr + stdout and not (cwd / "logs").exists()


@pytest.mark.parametrize("name, content, reason", BAD_ARTIFACTS, ids=[c[0] for c in BAD_ARTIFACTS])
def test_damaged_or_foreign_eval_only_file_is_one_error_line(name, content, reason, corpus, tmp_path, monkeypatch,
                                                              capsys):
    """EVAL_ONLY with a file that is not one of our artifacts: exit 2, one `error: EVAL_ONLY=...` line saying
    what is wrong, no traceback, nothing run (main() in this process; a real process below)."""
    for k, v in tiny_env(corpus).items():
        monkeypatch.setenv(k, v)
    path = write_bad_artifact(tmp_path, content)
    r = run_main(tmp_path / "run", tiny_env(corpus, EVAL_ONLY=path), monkeypatch, capsys)
    assert_one_eval_only_error(r.code, r.stdout, r.stderr, r.cwd, path, reason)


def test_a_truncated_eval_only_file_stops_a_real_process_with_one_line(corpus, tmp_path, monkeypatch):
    for k, v in tiny_env(corpus).items():
        monkeypatch.setenv(k, v)
    name, content, reason = next(case for case in BAD_ARTIFACTS if case[0] == "truncated-artifact")
    path = write_bad_artifact(tmp_path, content)
    run = run_script(tmp_path / "run", tiny_env(corpus, EVAL_ONLY=path), run_id="bad", timeout=120)
    assert_one_eval_only_error(run.proc.returncode, run.proc.stdout, run.proc.stderr, run.cwd, path, reason)


@pytest.mark.full
def test_gaussian_default_model_is_rate_controlled_under_the_cap(monkeypatch, tmp_path):
    """The full-size default model with Gaussian weights everywhere: int6 alone is over the cap (Gaussian rows
    use every level), so build_artifact must coarsen some matrices, fit 16,000,000 bytes with the code, and
    write a file that load_artifact reads back close to the originals."""
    knobs = set(TINY) | {"DATA_PATH", "TOKENIZER_PATH", "SMOKE", "VOCAB_SIZE", "MLP_MULT", "ROPE_BASE",
                         "QK_GAIN_INIT", "WORLD_SIZE", "SIZE_CAP_BYTES"}
    for key in knobs:
        monkeypatch.delenv(key, raising=False)
    args = train_gpt.Hyperparameters()
    assert (args.model_dim, args.patch_size, args.num_layers, args.decoder_layers) == (480, 8, 5, 7)
    model = train_gpt.build_model(args)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    lines = []
    blob = train_gpt.build_artifact(model.state_dict(), args, log=lines.append)
    code = len(SCRIPT.read_bytes())
    assert len(blob) + code <= 16_000_000, f"{len(blob)} + {code} bytes exceed the cap"
    first, last = lines[0], lines[-1]
    assert "(cap 16000000, over)" in first and "(cap 16000000, fits)" in last and len(lines) >= 2, lines
    assert f"artifact {len(blob)} bytes, total {len(blob) + code}" in last
    path = tmp_path / "gaussian.ptz"
    path.write_bytes(blob)
    stored = train_gpt.read_artifact(path)
    widths = {name: int(v["q"].abs().max()) for name, v in stored.items() if isinstance(v, dict)}
    assert {15, 31} <= set(widths.values())  # some matrices stepped down to int5, the rest int6 (or int8)
    reloaded = train_gpt.load_artifact(path, args).state_dict()
    for name, v in stored.items():
        if isinstance(v, dict):  # within half a step of the row's scale (Gaussian rows: no clipping at amax)
            original = model.state_dict()[name]
            bound = v["scale"].float()[:, None] / 2 * 1.001 + 1e-6
            over = (reloaded[name] - original).abs() > bound
            assert over.float().mean().item() < 0.01, name  # only clipped outliers may exceed it


def test_rate_control_steps_down_the_cheapest_matrices_and_logs_each_step(wide_model, monkeypatch):
    args, model = wide_model
    state = realistic(model).state_dict()
    lines = []
    full = train_gpt.build_artifact(state, args, log=lines.append)
    assert len(lines) == 1 and "fits" in lines[0]
    code = len(SCRIPT.read_bytes())
    monkeypatch.setenv("SIZE_CAP_BYTES", str(code + len(full) - 8000))
    lines = []
    blob = train_gpt.build_artifact(state, train_gpt.Hyperparameters(), log=lines.append)
    assert len(blob) + code <= code + len(full) - 8000 < len(full) + code
    sizes = [int(re.search(r"artifact (\d+) bytes", line).group(1)) for line in lines]
    assert sizes[0] == len(full) and sizes[-1] == len(blob) and sizes == sorted(sizes, reverse=True)
    errors = [float(re.search(r"mean relative error (\S+),", line).group(1)) for line in lines]
    assert errors == sorted(errors) and errors[-1] > errors[0]  # each step trades accuracy for bytes
    assert all(line.startswith(f"rate_control: step {i}:") for i, line in enumerate(lines))
    decoded = torch.load(io.BytesIO(lzma.decompress(blob)), weights_only=True)
    assert set(decoded) == set(train_gpt.quantize_state(state))  # same entries, some of them narrower


def test_rate_control_steps_down_the_matrix_that_costs_least_error_per_byte():
    """A known answer. One width down, a uniform matrix loses less relative accuracy than a Gaussian one (no tail
    to clip: ~8.5e-4 against ~1.9e-3), but the Gaussian one here is 5x larger and saves 5x the bytes, so it is the
    cheaper step per byte; 2,000 bytes over the cap need that one step only."""
    g = torch.Generator().manual_seed(0)
    state = {"uniform.weight": (torch.rand(96, 768, generator=g) - 0.5) * 0.04,
             "gaussian.weight": torch.randn(512, 768, generator=g) * 0.02}
    free = train_gpt.build_artifact(state, SimpleNamespace(size_cap_bytes=10**9), log=lambda msg: None)
    cap = len(SCRIPT.read_bytes()) + len(free) - 2000
    lines = []
    blob = train_gpt.build_artifact(state, SimpleNamespace(size_cap_bytes=cap), log=lines.append)
    stored = torch.load(io.BytesIO(lzma.decompress(blob)), weights_only=True)
    assert {name: int(v["q"].abs().max()) for name, v in stored.items()} == {"uniform.weight": 31,
                                                                              "gaussian.weight": 15}
    assert len(lines) == 2 and lines[1].startswith("rate_control: step 1: 1 matrices one width down"), lines


@pytest.mark.parametrize("over, stepped", [(1 / 1.05, 2), (1 / 1.2, 1)])
def test_rate_control_steps_as_many_matrices_as_the_overshoot_plus_a_tenth_needs(over, stepped):
    """Four alike Gaussian matrices, each saving about the same entropy S one width down (within 2% here): an
    overshoot of S / 1.05 is more than S / 1.1, so one step takes two matrices (LZMA gets near the entropy, not below
    it); an overshoot of S / 1.2 takes one."""
    g = torch.Generator().manual_seed(0)
    state = {f"m{i}.weight": torch.randn(128, 768, generator=g) * 0.02 for i in range(4)}
    saved = [train_gpt.entropy_bytes(train_gpt.quantize_matrix(w, None, 6)) -
             train_gpt.entropy_bytes(train_gpt.quantize_matrix(w, None, 5)) for w in state.values()]
    assert max(saved) < 1.02 * min(saved)  # the precondition: alike matrices
    free = train_gpt.build_artifact(state, SimpleNamespace(size_cap_bytes=10**9), log=lambda msg: None)
    cap = len(SCRIPT.read_bytes()) + len(free) - int(min(saved) * over)
    lines = []
    blob = train_gpt.build_artifact(state, SimpleNamespace(size_cap_bytes=cap), log=lines.append)
    assert lines[1].startswith(f"rate_control: step 1: {stepped} matrices one width down"), lines
    assert len(blob) + len(SCRIPT.read_bytes()) <= cap


def test_a_tiny_run_under_a_tight_cap_coarsens_and_still_evaluates(sized_runs, tmp_path):
    """Through the command line: a cap below what the run's artifact needs at the default widths is met by
    coarsening (logged), the run exits 0 and its sizes fit; a cap below the code alone is exit 3 (see below)."""
    free = sized_runs[0]
    need = size_line(free, "Total submission size int6+lzma:")
    tight = run_script(tmp_path / "tight", dict(free.env, SIZE_CAP_BYTES=str(need - 3000)), run_id="tight")
    assert tight.proc.returncode == 0, tight.proc.stderr[-2000:]
    assert tight.lines("rate_control: step 1:") and "(cap" in tight.lines("rate_control: step 0:")[0]
    total = size_line(tight, "Total submission size int6+lzma:")
    assert total <= need - 3000 and (tight.cwd / "final_model.int6.ptz").stat().st_size + len(SCRIPT.read_bytes()) \
        == total
    assert tight.lines("final_int6_lzma_roundtrip_exact")


# -----------------------------------------------------------------------------------------------------------------
# Size accounting and the cap
# -----------------------------------------------------------------------------------------------------------------


def test_check_size_lines_and_cap():
    lines = []
    assert train_gpt.check_size(900, 100, lines.append, cap=1000) == 1000  # exactly at the cap: passes
    assert lines[0] == "Serialized model int6+lzma: 900 bytes"
    assert lines[1] == "Code size: 100 bytes"
    assert lines[2].startswith("Total submission size int6+lzma: 1000 bytes")
    assert not any("EXCEEDED" in line for line in lines)
    lines.clear()
    with pytest.raises(train_gpt.SizeCapExceeded):
        train_gpt.check_size(901, 100, lines.append, cap=1000)
    assert lines[2].startswith("Total submission size int6+lzma: 1001 bytes")
    loud = [line for line in lines if "SIZE CAP EXCEEDED" in line]
    assert len(loud) == 1 and "1001" in loud[0] and "1 bytes over" in loud[0] and "not a valid submission" in loud[0]
    lines.clear()
    with pytest.raises(train_gpt.SizeCapExceeded):  # the default cap is the challenge's decimal 16 MB
        train_gpt.check_size(16_000_000, 1, lines.append)
    assert train_gpt.check_size(15_999_999, 1, lambda msg: None) == 16_000_000


def assert_stopped_over_the_cap(run, cap: int):
    """The size lines and the loud line, then exit 3 without evaluating or writing a submission."""
    assert run.proc.returncode == 3, (run.proc.returncode, run.proc.stderr[-2000:])
    assert len(run.lines("!!! SIZE CAP EXCEEDED")) == 1 and run.lines("Total submission size int6+lzma:")
    assert not [line for line in run.log.splitlines() if line.startswith(("final_", "ttt_", "sliding_"))]
    assert not (run.cwd / "logs" / f"{run.run_id}.submission.json").exists()
    assert "Traceback" not in run.proc.stderr
    error = run.proc.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: SIZE_CAP_BYTES={cap}: code + artifact take"), error


def test_over_the_cap_a_training_run_exits_3_before_any_evaluation(over_cap_run):
    """A cap below the script's own size can never be met (conftest's over_cap_run: 50,000 bytes)."""
    assert_stopped_over_the_cap(over_cap_run, 50_000)


def test_over_the_cap_eval_only_exits_3_before_any_evaluation(corpus, tmp_path, tiny_args):
    artifact = tmp_path / "a.ptz"
    model = realistic(train_gpt.build_model(tiny_args()))
    artifact.write_bytes(train_gpt.serialize_artifact(train_gpt.quantize_state(model.state_dict())))
    env = tiny_env(corpus, SIZE_CAP_BYTES=1000, SLIDING_EVAL=1, EVAL_ONLY=str(artifact))
    assert_stopped_over_the_cap(run_script(tmp_path / "run", env, run_id="over"), 1000)


@pytest.mark.parametrize("fault", ["signal", "disk full", "directory in the way"])
def test_an_export_that_cannot_finish_leaves_no_partial_artifact(fault, tiny_args, cpu_runtime, tmp_path, monkeypatch):
    """A stop signal that arrives while the artifact is built, a write that fails (ENOSPC at fsync), a directory
    where the file should be: no temporary file stays, an earlier artifact keeps every byte, and the error names the
    path and the cause (SIGTERM; the OSError's words)."""
    monkeypatch.chdir(tmp_path)
    model, args = train_gpt.build_model(tiny_args()), tiny_args()
    before = earlier_artifact(tmp_path)
    if fault == "signal":
        serialize = train_gpt.serialize_artifact

        def signalled_while_serializing(qstate):
            monkeypatch.setattr(train_gpt.Stopped, "signum", signal.SIGTERM)
            return serialize(qstate)
        monkeypatch.setattr(train_gpt, "serialize_artifact", signalled_while_serializing)
        expected, reason = train_gpt.Stopped, "SIGTERM"
    elif fault == "disk full":
        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "fsync", full)
        expected, reason = train_gpt.WriteFailed, "No space left on device"
    else:
        (tmp_path / train_gpt.ARTIFACT_NAME).unlink()
        (tmp_path / train_gpt.ARTIFACT_NAME).mkdir()
        expected, reason = train_gpt.WriteFailed, "Is a directory"
    with pytest.raises(expected, match=reason) as failure:
        train_gpt.export_artifact(model, None, args, cpu_runtime, lambda msg: None)
    if fault != "signal":
        assert str(failure.value).startswith(f"{(tmp_path / train_gpt.ARTIFACT_NAME).resolve()}: cannot write the")
        assert failure.value.exit_code == 6
    if fault != "directory in the way":
        assert (tmp_path / train_gpt.ARTIFACT_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [train_gpt.ARTIFACT_NAME]


@pytest.mark.parametrize("rank0", [0, 6, 3])
def test_the_other_ranks_end_with_rank_0_s_export_failure(tiny_args, cpu_runtime, tmp_path, monkeypatch, rank0):
    """On rank 1 of 2, which builds and writes nothing, export_artifact returns the artifact's path when rank 0 wrote
    it, and raises with rank 0's exit status when it could not (6: the write failed, 3: over the cap): no rank goes
    on to evaluate alone."""
    monkeypatch.chdir(tmp_path)

    def all_reduce(t, op=train_gpt.dist.ReduceOp.SUM, group=None):  # rank 0's status meets this rank's
        if op == train_gpt.dist.ReduceOp.MAX:
            t[0] = max(t[0].item(), rank0)

    monkeypatch.setattr(train_gpt.dist, "all_reduce", all_reduce)
    cpu_runtime.world, cpu_runtime.rank, cpu_runtime.master = 2, 1, False
    model = train_gpt.build_model(tiny_args())
    if rank0:
        with pytest.raises(train_gpt.RunError) as failure:
            train_gpt.export_artifact(model, None, tiny_args(), cpu_runtime, lambda msg: None)
        assert failure.value.exit_code == rank0
    else:
        path = train_gpt.export_artifact(model, None, tiny_args(), cpu_runtime, lambda msg: None)
        assert path == train_gpt.Path(train_gpt.ARTIFACT_NAME)
    assert not list(tmp_path.iterdir())  # rank 1 writes nothing


def test_an_artifact_that_cannot_be_written_ends_the_run_with_one_line(corpus, tmp_path, monkeypatch, capsys):
    """Through main: a directory where final_model.int6.ptz should go ends the run after training with one line
    naming the path and the error, in the log and on stderr, exit 6; no temporary file and no submission."""
    env = tiny_env(corpus, ITERATIONS=2, QUANT="rtn", TTT_ENABLED=0, PREQUANT_EVAL=0, RUN_ID="unwritable")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    (tmp_path / train_gpt.ARTIFACT_NAME).mkdir()
    assert train_gpt.main() == 6
    path = (tmp_path / train_gpt.ARTIFACT_NAME).resolve()
    expected = f"error: {path}: cannot write the artifact (Is a directory); free disk space or fix the path"
    assert capsys.readouterr().err.splitlines() == [expected]
    log = (tmp_path / "logs" / "unwritable.txt").read_text().splitlines()
    assert log[-1] == expected and any(line.startswith("step:2/2 train_loss:") for line in log)
    assert not leftovers(tmp_path) and not (tmp_path / "logs" / "unwritable.submission.json").exists()


def test_sigterm_during_export_leaves_the_earlier_artifact(corpus, tmp_path):
    """SIGTERM once training has ended (during GPTQ calibration, made long here): the run stops within seconds with
    one line naming the export, exit 143; the earlier artifact keeps every byte."""
    before = earlier_artifact(tmp_path)
    env = tiny_env(corpus, ITERATIONS=2, GPTQ_CALIB_BATCHES=100_000, TTT_ENABLED=0)
    run, waited = signal_run(tmp_path, env, "weight_avg:")
    assert run.proc.returncode == 128 + signal.SIGTERM and waited < 10, (run.proc.returncode, waited)
    assert one_error_line(run) == ("error: stopped by SIGTERM during export (GPTQ calibration); no artifact was "
                                   "written (an earlier one is left as it was)")
    assert (tmp_path / train_gpt.ARTIFACT_NAME).read_bytes() == before and not leftovers(tmp_path)


def size_line(run, prefix: str) -> int:
    lines = run.lines(prefix)
    assert len(lines) == 1, f"expected one '{prefix}' line, found {lines}"
    return int(re.match(rf"{re.escape(prefix)} (\d+) bytes", lines[0]).group(1))


@pytest.fixture(scope="module")
def sized_runs(corpus, tmp_path_factory):
    """A short run that writes an artifact with an int6 tensor (patch_proj 96x768), then EVAL_ONLY on it."""
    cwd = tmp_path_factory.mktemp("sizes")
    env = tiny_env(corpus, MODEL_DIM=96, PATCH_SIZE=8, ITERATIONS=2, TRAIN_BATCH_TOKENS=504, TTT_ENABLED=0,
                   PREQUANT_EVAL=0)
    code = len(SCRIPT.read_bytes())
    first = run_script(cwd, env, run_id="sizes")
    assert first.proc.returncode == 0, first.proc.stderr[-3000:]
    artifact_bytes = (cwd / train_gpt.ARTIFACT_NAME).read_bytes()
    second = run_script(cwd, dict(env, EVAL_ONLY=train_gpt.ARTIFACT_NAME), run_id="evalonly")
    assert second.proc.returncode == 0, second.proc.stderr[-3000:]
    return first, second, artifact_bytes, code


def test_size_lines_equal_real_file_sizes(sized_runs):
    first, second, artifact_bytes, code = sized_runs
    model_bytes = len(artifact_bytes)
    for run in (first, second):
        assert size_line(run, "Serialized model int6+lzma:") == model_bytes
        assert size_line(run, "Code size:") == code
        assert size_line(run, "Total submission size int6+lzma:") == model_bytes + code
        assert not run.lines("!!!")  # (the log's copy of the script mentions the message: match lines only)
        info = json.loads((run.cwd / "logs" / f"{run.run_id}.submission.json").read_text())
        assert info["bytes_model_int6_lzma"] == model_bytes
        assert info["bytes_code"] == code
        assert info["bytes_total"] == model_bytes + code
        exact = run.lines("final_int6_lzma_roundtrip_exact")[-1]
        assert info["val_bpb"] == pytest.approx(float(re.search(r"val_bpb:([0-9.]+)", exact).group(1)), abs=1e-8)


def test_written_artifact_decodes_independently(sized_runs, tiny_args):
    first, _, artifact_bytes, _ = sized_runs
    state = torch.load(io.BytesIO(lzma.decompress(artifact_bytes)), weights_only=True)
    assert not any(k.startswith("projector.") for k in state)
    args = tiny_args(MODEL_DIM=96, PATCH_SIZE=8)
    model_keys = {k for k in train_gpt.build_model(args).state_dict() if not k.startswith("projector.")}
    assert set(state) == model_keys
    assert {k for k, v in state.items() if isinstance(v, dict)} == {"patch_proj.weight"} | TABLES
    v = state["patch_proj.weight"]
    assert v["q"].dtype == torch.int8 and v["q"].shape == (96, 768)
    assert int(v["q"].min()) >= -31 and int(v["q"].max()) <= 31 and int(v["q"].abs().max()) >= 30
    assert v["scale"].dtype == torch.float16 and v["scale"].shape == (96,) and (v["scale"].float() > 0).all()
    for name, t in state.items():
        if isinstance(t, dict):
            continue
        expected = torch.float32 if re.search(r"(attn_scale|mlp_scale|resid_mix|q_gain)$", name) else torch.float16
        assert t.dtype == expected, name
        assert torch.isfinite(t.float()).all(), name
    assert "quant:gptq" in first.lines("artifact:")[0]


def test_eval_only_reproduces_the_roundtrip_score_exactly(sized_runs):
    first, second, _, _ = sized_runs
    a = first.lines("final_int6_lzma_roundtrip_exact")
    b = second.lines("final_int6_lzma_roundtrip_exact")
    assert len(a) == 1 and len(b) == 1
    assert a[0] == b[0]
    assert not second.lines("step:")  # no training in EVAL_ONLY


# -----------------------------------------------------------------------------------------------------------------
# Late QAT
# -----------------------------------------------------------------------------------------------------------------


def test_late_qat_covers_exactly_the_int6_layers_and_training_forwards(wide_model):
    args, model = wide_model
    linears = {name: m for name, m in model.named_modules() if isinstance(m, train_gpt.CastedLinear)}
    train_gpt.set_late_qat(model, True)
    assert {f"{n}.weight" for n, m in linears.items() if m.qat} == WIDE_INT6
    assert not linears["projector.fc"].qat  # large, but never stored
    ids = torch.randint(4, 260, (2, args.window), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.train()
        train_qat = model.forward_logits(ids)
        model.eval()
        eval_qat = model.forward_logits(ids)
        train_gpt.set_late_qat(model, False)
        assert not any(m.qat for m in linears.values())
        eval_plain = model.forward_logits(ids)
        model.train()
        train_plain = model.forward_logits(ids)
        # with QAT, a training forward is the plain forward of a model whose int6 layers hold fake-quantised weights
        reference = randomize(train_gpt.build_model(args), seed=4, std=0.05)
        for name, m in dict(reference.named_modules()).items():
            if f"{name}.weight" in WIDE_INT6:
                m.weight.copy_(train_gpt.fake_quantize_int6(m.weight))
        expected = reference.train().forward_logits(ids)
    assert torch.equal(eval_qat, eval_plain)  # never in evaluation
    assert torch.equal(train_plain, eval_plain)
    assert not torch.allclose(train_qat, train_plain, atol=1e-4)
    assert torch.allclose(train_qat, expected, rtol=1e-5, atol=1e-5)


def test_straight_through_estimator_passes_gradients_unchanged():
    g = torch.Generator().manual_seed(0)
    layer = train_gpt.CastedLinear(40, 24)
    x = torch.randn(7, 40, generator=g)
    layer.qat = True
    layer.train()
    y = layer(x)
    assert torch.allclose(y, F.linear(x, train_gpt.fake_quantize_int6(layer.weight.detach())), atol=1e-6)
    y.square().sum().backward()  # a loss whose gradient depends on the (quantised) output
    w = layer.weight.detach().clone().requires_grad_(True)
    F.linear(x, train_gpt.fake_quantize_int6(w).detach() + w - w.detach()).square().sum().backward()
    assert torch.allclose(layer.weight.grad, w.grad, atol=1e-5)
    layer.weight.grad = None
    layer(x).sum().backward()
    w2 = layer.weight.detach().clone().requires_grad_(True)
    F.linear(x, w2).sum().backward()
    assert torch.equal(layer.weight.grad, w2.grad)  # d sum / dW = ones^T x, as without quantisation


def test_qat_runs_in_training_only_and_is_off_for_eval_and_ttt(tiny_args, monkeypatch, tmp_path):
    """A short training run crossing LATE_QAT_THRESHOLD fake-quantises in its training steps, never in its
    inference-mode evaluation, and leaves every layer with QAT off; the reloaded artifact's TTT never does."""
    args = tiny_args(MODEL_DIM=96, PATCH_SIZE=8, ITERATIONS=3, WARMDOWN_ITERS=3, LATE_QAT_THRESHOLD=0.9,
                     TRAIN_BATCH_TOKENS=504, TTT_EPOCHS=1, EVAL_MAX_SECONDS=1e6)
    rt = train_gpt.Runtime(args)
    calls = []
    original = train_gpt.fake_quantize_int6
    monkeypatch.setattr(train_gpt, "fake_quantize_int6",
                        lambda w: calls.append(torch.is_inference_mode_enabled()) or original(w))
    val = train_gpt.load_validation_tokens(args)
    model = train_gpt.build_model(args)
    log = []
    train_gpt.Trainer(args, rt, model, val, log.append).run()
    assert any(line.startswith("late_qat: on at step:1") for line in log), log
    assert calls and not any(calls)  # fake quantisation ran, and never under inference mode
    assert all(not m.qat for m in model.modules() if isinstance(m, train_gpt.CastedLinear))
    calls.clear()
    path = tmp_path / "a.ptz"
    path.write_bytes(train_gpt.serialize_artifact(train_gpt.quantize_state(model.state_dict())))
    loaded = train_gpt.load_artifact(path, args)
    assert all(not m.qat for m in loaded.modules() if isinstance(m, train_gpt.CastedLinear))
    before = loaded.patch_proj.weight.detach().clone()
    train_gpt.evaluate_score_first(loaded, val, args, rt, log.append, True, time.perf_counter())
    assert not torch.equal(loaded.patch_proj.weight, before)  # TTT adapted the int6 layer...
    assert calls == []  # ...without fake quantisation


# -----------------------------------------------------------------------------------------------------------------
# EMA / SWA
# -----------------------------------------------------------------------------------------------------------------


def set_params(model: torch.nn.Module, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return [p.detach().clone() for p in model.parameters()]


def test_ema_matches_hand_recursion(tiny_args):
    args = tiny_args(WEIGHT_AVG="ema", EMA_DECAY=0.8)
    model = train_gpt.build_model(args)
    ema = [p.detach().clone().double() for p in model.parameters()]  # starts at the weights it is created with
    averager = train_gpt.WeightAverager(model, args)
    for k in range(1, 6):
        live = set_params(model, seed=k)
        averager.update(k, 1.0)
        ema = [0.8 * a + 0.2 * p.double() for a, p in zip(ema, live)]
    message = averager.apply()
    assert message == "weight_avg:ema decay:0.8 applied"
    for p, a in zip(model.parameters(), ema):
        assert torch.allclose(p.double(), a, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(next(model.parameters()).detach(), live[0], atol=1e-2)  # not the live weights


def test_swa_averages_the_right_snapshots(tiny_args):
    args = tiny_args(WEIGHT_AVG="swa", SWA_EVERY=2, SWA_START_SCALE=0.5)
    model = train_gpt.build_model(args)
    averager = train_gpt.WeightAverager(model, args)
    scales = {1: 0.9, 2: 0.8, 3: 0.45, 4: 0.45, 5: 0.3, 6: 0.5, 7: 0.2, 8: 0.1}
    taken = []
    for step, scale in scales.items():
        live = set_params(model, seed=100 + step)
        averager.update(step, scale)
        if step in (4, 8):  # scale < 0.5 and step % 2 == 0 (step 6 has scale 0.5: not below)
            taken.append(live)
    assert averager.snapshots == 2
    assert averager.apply() == "weight_avg:swa snapshots:2 applied"
    for i, p in enumerate(model.parameters()):
        mean = (taken[0][i].double() + taken[1][i].double()) / 2
        assert torch.allclose(p.double(), mean, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind, scale", [("none", 0.0), ("swa", 0.9)])
def test_no_average_leaves_the_live_weights(tiny_args, kind, scale):
    args = tiny_args(WEIGHT_AVG=kind, SWA_EVERY=1)
    model = train_gpt.build_model(args)
    averager = train_gpt.WeightAverager(model, args)
    for step in range(1, 4):
        live = set_params(model, seed=step)
        averager.update(step, scale)  # SWA at scale 0.9 never reaches SWA_START_SCALE=0.2: no snapshot
    assert averager.apply() == f"weight_avg:{kind} applied:none (live weights exported)"
    for p, q in zip(model.parameters(), live):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kind", ["ema", "swa", "none"])
def test_a_diverged_run_says_what_became_of_its_averaged_weights(tiny_args, kind):
    """The divergence line's account of the averaged weights: finite ones are still no result (and not exported);
    weights averaged from non-finite ones are non-finite; without averaging (or an SWA snapshot) there are none."""
    args = tiny_args(WEIGHT_AVG=kind, SWA_EVERY=1, SWA_START_SCALE=1.0)
    model = train_gpt.build_model(args)
    averager = train_gpt.WeightAverager(model, args)
    expected = "no averaged weights" if kind != "ema" else "the EMA weights are finite, but no result either"
    assert averager.after_divergence() == expected
    averager.update(1, 0.5)
    with torch.no_grad():
        model.head.weight[0, 0] = math.nan
    averager.update(2, 0.5)
    expected = "no averaged weights" if kind == "none" else f"the {kind.upper()} weights are non-finite too"
    assert averager.after_divergence() == expected
