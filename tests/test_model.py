"""Model: the reference's parameter count, causality through forward_logits, the pieces' numerics."""
import pytest
import torch

import train_gpt
from conftest import TINY, randomize


def test_default_parameter_count_matches_reference(monkeypatch):
    for key in list(TINY) + ["DATA_PATH", "TOKENIZER_PATH", "SMOKE"]:
        monkeypatch.delenv(key, raising=False)
    model = train_gpt.build_model(train_gpt.Hyperparameters())
    assert sum(p.numel() for p in model.parameters()) == 24_593_530
    stored = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("projector."))
    assert stored == 24_593_530 - 645_120  # the JEPA projector (480->960->192) is training-only


# MODEL_DIM=96 with patches of 8 makes the patch projection (96 x 768) an int6 layer, so QAT has a layer to switch
QAT_SIZE = dict(MODEL_DIM=96, PATCH_SIZE=8)


@pytest.mark.parametrize("mode", ["eval", "train", "train_qat"])
def test_logits_for_byte_i_depend_only_on_earlier_bytes(tiny_args, mode):
    args = tiny_args(**QAT_SIZE) if mode == "train_qat" else tiny_args()
    model = randomize(train_gpt.build_model(args))
    model.train(mode != "eval")
    train_gpt.set_late_qat(model, mode == "train_qat")
    assert any(m.qat for m in model.modules() if isinstance(m, train_gpt.CastedLinear)) == (mode == "train_qat")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 260, (2, args.window), generator=g)
    base = model.forward_logits(ids).detach()
    assert base.shape == (2, args.window, 260) and base.dtype == torch.float32
    for j in (0, 3, 4, 17, 31, args.window - 1):  # patch starts, middles and ends
        changed = ids.clone()
        changed[:, j] = (changed[:, j] + 101 - 4) % 256 + 4
        out = model.forward_logits(changed).detach()
        assert torch.equal(out[:, :j + 1], base[:, :j + 1]), f"logits up to {j} moved when byte {j} changed"
        if j + 1 < args.window:
            assert not torch.allclose(out[:, j + 1], base[:, j + 1]), f"byte {j} never reaches position {j + 1}"


@pytest.mark.parametrize("mode", ["eval", "train", "train_qat"])
def test_windows_of_one_batch_do_not_leak_into_each_other(tiny_args, mode):
    """Each row of a batch is its own window: changing every byte of one row leaves the other rows' logits
    bit-identical (training forward, evaluation forward and the training loss's logits alike)."""
    args = tiny_args(**QAT_SIZE) if mode == "train_qat" else tiny_args()
    model = randomize(train_gpt.build_model(args))
    model.train(mode != "eval")
    train_gpt.set_late_qat(model, mode == "train_qat")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, 260, (3, args.window), generator=g)
    with torch.no_grad():
        base = model.forward_logits(ids)
        for row in range(3):
            changed = ids.clone()
            changed[row] = torch.randint(4, 260, (args.window,), generator=g)
            out = model.forward_logits(changed)
            others = [r for r in range(3) if r != row]
            assert torch.equal(out[others], base[others]), f"changing window {row} moved another window's logits"
            assert not torch.equal(out[row], base[row])
    alone = torch.cat([model(ids[r:r + 1])[0].detach().reshape(1) for r in range(3)])
    together = model(ids)[0].detach()
    torch.testing.assert_close(together, alone.mean(), rtol=1e-5, atol=1e-6)  # the batch CE is the rows' mean


def test_first_position_is_predicted_from_the_start_state_alone(tiny_args):
    args = tiny_args()
    model = randomize(train_gpt.build_model(args)).eval()
    a = torch.randint(4, 260, (1, args.window))
    b = torch.randint(4, 260, (1, args.window))
    assert torch.equal(model.forward_logits(a)[:, 0], model.forward_logits(b)[:, 0])


def test_training_forward_shares_the_logits_path(tiny_args):
    """forward's CE equals the CE computed from forward_logits over positions 1.. (one forward path)."""
    args = tiny_args()
    model = randomize(train_gpt.build_model(args)).eval()
    ids = torch.randint(4, 260, (3, args.window))
    ce, mse, reg = model(ids, train_gpt.sigreg_directions(args.latent_dim, 8, 0, torch.device("cpu")))
    logits = model.forward_logits(ids)
    expected = torch.nn.functional.cross_entropy(logits[:, 1:].reshape(-1, 260), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(ce, expected, rtol=1e-5, atol=1e-6)
    assert mse.item() > 0 and reg.item() > 0
    ce_only, zero_mse, zero_reg = model(ids)
    torch.testing.assert_close(ce_only, ce)
    assert zero_mse.item() == 0 and zero_reg.item() == 0


def test_zero_initialised_head_predicts_uniform_bytes(tiny_args):
    args = tiny_args()
    model = train_gpt.build_model(args)
    ce, _, _ = model(torch.randint(4, 260, (2, args.window)))
    assert ce.item() == pytest.approx(torch.log(torch.tensor(260.0)).item(), abs=1e-5)


def test_sigreg_is_small_for_gaussian_and_large_for_collapsed_or_scaled():
    g = torch.Generator().manual_seed(0)
    dirs = train_gpt.sigreg_directions(16, 64, seed=3, device=torch.device("cpu"))
    gaussian = torch.randn(8192, 16, generator=g)
    small = train_gpt.sigreg(gaussian, dirs).item()
    collapsed = train_gpt.sigreg(torch.zeros(8192, 16), dirs).item()
    scaled = train_gpt.sigreg(3 * gaussian, dirs).item()
    assert small < 1e-3
    assert collapsed > 100 * small and scaled > 100 * small
    # the closed form for all-zero samples: integral of w(t) (1 - phi(t))^2 over [0, 3]
    t = torch.linspace(0, 3, 10001)
    phi = torch.exp(-0.5 * t**2)
    assert collapsed == pytest.approx(torch.trapezoid((1 - phi) ** 2 * phi, t).item(), rel=1e-3)


def test_sigreg_directions_are_unit_and_shared_by_seed():
    a = train_gpt.sigreg_directions(12, 5, seed=9, device=torch.device("cpu"))
    b = train_gpt.sigreg_directions(12, 5, seed=9, device=torch.device("cpu"))
    c = train_gpt.sigreg_directions(12, 5, seed=10, device=torch.device("cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a.norm(dim=0), torch.ones(5))


def test_rotary_attention_scores_depend_only_on_relative_position():
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    q = torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8)
    k = torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8)
    rq, rk = train_gpt.apply_rotary(q, inv_freq), train_gpt.apply_rotary(k, inv_freq)
    scores = (rq[0, 0] @ rk[0, 0].T)
    for offset in (0, 1, 5):
        diag = torch.diagonal(scores, offset)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=1e-4, atol=1e-4)


def test_patch_embedding_reads_only_its_own_patch(tiny_args):
    args = tiny_args()
    model = randomize(train_gpt.build_model(args))
    ids = torch.randint(4, 260, (1, args.window))
    changed = ids.clone()
    changed[0, 5] += 1  # patch 1 (bytes 4..7)
    a, b = model.embed_patches(ids), model.embed_patches(changed)
    differs = (a - b).abs().amax(dim=-1)[0] > 0
    assert differs.tolist() == [i == 1 for i in range(args.window // args.patch_size)]


def test_fake_quantize_int6_rounds_rows_to_63_levels():
    w = torch.randn(5, 40)
    fq = train_gpt.fake_quantize_int6(w)
    scale = w.abs().amax(dim=1, keepdim=True) / 31
    levels = fq / scale
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    assert levels.abs().max().item() <= 31 + 1e-4
    assert ((fq - w).abs() <= scale / 2 + 1e-6).all()


# -----------------------------------------------------------------------------------------------------------------
# FLOP accounting against torch.utils.flop_counter
# -----------------------------------------------------------------------------------------------------------------

ATTENTION_OPS = ("bmm",)  # the math SDPA backend computes QK^T and AV as batched matmuls; linear layers use mm


def counted_flops(args, training: bool, windows: int = 2) -> tuple[float, float]:
    """(linear-layer FLOPs, attention FLOPs) per target byte, as flop_counter counts one forward (and backward)
    on the meta device with the math attention backend, which computes attention densely (every query against
    every key; the causal mask is applied to the full score matrix)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = train_gpt.ByteJEPA(args)
        ids = torch.zeros(windows, args.window, dtype=torch.long)
        directions = torch.ones(args.latent_dim, args.sigreg_slices)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        if training:
            ce, mse, reg = model(ids, directions)
            (ce + mse + reg).backward()
        else:
            model.forward_logits(ids)
    by_op = {str(op).split(".")[1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = sum(n for op, n in by_op.items() if op in ATTENTION_OPS)
    per_byte = windows * args.train_seq_len
    return (counter.get_total_flops() - attention) / per_byte, attention / per_byte


@pytest.mark.parametrize("size", ["tiny", "default"])
@pytest.mark.parametrize("training", [True, False])
def test_flops_per_byte_match_flop_counter(tiny_args, monkeypatch, size, training):
    if size == "default":
        for key in list(TINY) + ["DATA_PATH", "TOKENIZER_PATH", "SMOKE"]:
            monkeypatch.delenv(key, raising=False)
        args = train_gpt.Hyperparameters()
    else:
        args = tiny_args(NUM_HEADS=4, NUM_KV_HEADS=2)  # grouped-query attention in the encoder
    analytic = train_gpt.flops_per_byte(args, training)
    attention = analytic["encoder_attention"] + analytic["decoder_attention"]
    linear, counted_attention = counted_flops(args, training)
    assert linear == pytest.approx(sum(analytic.values()) - attention, rel=0.01)
    # the counter's dense attention is the causal count scaled by n^2 / (n (n+1) / 2) for n queries
    patches, T = args.window // args.patch_size, args.window
    dense = (analytic["encoder_attention"] * 2 * patches / (patches + 1) +
             analytic["decoder_attention"] * 2 * T / (T + 1))
    assert counted_attention == pytest.approx(dense, rel=0.01)


def test_default_flops_per_byte_by_hand(monkeypatch):
    """The reference model, counted by hand per target byte (d=480, 2048-byte window, 256 patches): decoder
    matmuls 7 x 16 d^2 (q, k, v, proj 8 d^2, MLP 8 d^2) + latent_in 2 x 192 x 480 / 8; decoder attention
    7 x 4 d x (2048 x 2049 / 2) / 2047."""
    for key in list(TINY) + ["DATA_PATH", "TOKENIZER_PATH", "SMOKE"]:
        monkeypatch.delenv(key, raising=False)
    f = train_gpt.flops_per_byte(train_gpt.Hyperparameters(), training=False)
    d = 480
    assert f["decoder_blocks"] == pytest.approx((7 * 16 * d * d * 2048 + 2 * 192 * d * 256) / 2047)
    assert f["decoder_attention"] == pytest.approx(7 * 4 * d * 2048 * 2049 / 2 / 2047)
    train = sum(train_gpt.flops_per_byte(train_gpt.Hyperparameters(), training=True).values())
    assert round(train / 1e6, 1) == 135.0
