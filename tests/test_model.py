"""Model: the reference's parameter count, causality through forward_logits, the pieces' numerics."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt
from conftest import REFERENCE, ROOT, TINY, WORD_PATCHES, randomize, realistic

FLEX_ON_CPU = tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 6)  # FlexAttention compiles for the CPU


def default_args(monkeypatch, **overrides) -> train_gpt.Hyperparameters:
    """The full-size defaults (no tiny configuration in the environment), with `overrides`."""
    for key in list(TINY) + list(REFERENCE) + ["DATA_PATH", "TOKENIZER_PATH", "SMOKE"]:
        monkeypatch.delenv(key, raising=False)
    for key, value in overrides.items():
        monkeypatch.setenv(key, value)
    return train_gpt.Hyperparameters()


@pytest.mark.parametrize("config", ["reference", "default"])
def test_parameter_counts_of_the_reference_and_the_default(monkeypatch, config):
    """The README's reference line rebuilds the reference entry (24,593,530 parameters); the default adds the
    per-slot and injected latent projections (2 x 192 x 3840) and two n-gram tables (4096 x 120, projected to
    480): 27,074,651."""
    model = train_gpt.build_model(default_args(monkeypatch, **(REFERENCE if config == "reference" else {})))
    added = 2 * 192 * 3840 - 192 * 480 + 2 * (4096 + 480) * 120 + 480 + 1  # latent, n-grams, smear gate
    total = 24_593_530 + (0 if config == "reference" else added)
    assert sum(p.numel() for p in model.parameters()) == total
    stored = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("projector."))
    assert stored == total - 645_120  # the JEPA projector (480->960->192) is training-only


def test_readme_gives_the_reference_line():
    text = " ".join((ROOT / "README.md").read_text().split())
    line = text.split("24,593,530 parameters", 1)[1].split("`")[1]
    assert line.endswith("train_gpt.py") and all(f"{k}={v}" in line.split() for k, v in REFERENCE.items()), line


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
    assert_causal(model, ids, (0, 3, 4, 17, 31, args.window - 1))  # patch starts, middles and ends


def assert_causal(model, ids: torch.Tensor, positions) -> None:
    """Changing byte j leaves the logits of positions <= j bit-identical and moves position j+1."""
    base = model.forward_logits(ids).detach()
    for j in positions:
        changed = ids.clone()
        changed[:, j] = (changed[:, j] + 101 - 4) % 256 + 4
        out = model.forward_logits(changed).detach()
        assert torch.equal(out[:, :j + 1], base[:, :j + 1]), f"logits up to {j} moved when byte {j} changed"
        if j + 1 < ids.size(1):
            assert not torch.allclose(out[:, j + 1], base[:, j + 1]), f"byte {j} never reaches position {j + 1}"


# every issue-9 knob on, at a decoder width of its own; its window (16) is shorter than the 64-byte window
REBALANCED = dict(DECODER_DIM=24, DECODER_LAYERS=3, DECODER_WINDOW=16, LATENT_PER_SLOT=1, LATENT_INJECT_LAYERS=3,
                  LATENT_NORM=1, NGRAM_BUCKETS=97, NGRAM_DIM=6, SMEAR_GATE=1)


@pytest.mark.parametrize("patch", [4, 8])
@pytest.mark.parametrize("window", [0, 16])
def test_rebalanced_decoder_is_causal(tiny_args, patch, window):
    """Every knob on, patches of 4 and 8, decoder window on and off: changing byte j leaves the logits of
    positions <= j bit-identical and moves position j+1, for every j (a BOS in the window exercises the smear
    gate's shut position)."""
    args = tiny_args(**dict(REBALANCED, PATCH_SIZE=patch, DECODER_WINDOW=window))
    model = randomize(train_gpt.build_model(args)).eval()
    ids = torch.randint(4, 260, (2, args.window), generator=torch.Generator().manual_seed(1))
    ids[:, 21] = train_gpt.BOS_ID
    assert_causal(model, ids, range(args.window))


def segments(ids: torch.Tensor, patch: torch.Tensor) -> str:
    """A window's patches as text, "|" between patches, "^" for BOS."""
    out = {}
    for b, p in zip(ids.tolist(), patch.tolist()):
        out.setdefault(p, bytearray()).append(ord("^") if b == train_gpt.BOS_ID else b - train_gpt.BYTE_OFFSET)
    return "|".join(bytes(v).decode() for v in out.values())


@pytest.mark.parametrize("slots,tail,expected", [
    (40, 54, "^|Hello,| world!| \u00c7a |va?|\n^|abcdefgh|ijklmnop|qrstuvwx|yz |end"),
    # 9 slots: at byte 19 ("v") the 5 patches begun plus ceil(34 / 8) for the rest would be 10: from there, 8 bytes each
    (9, 19, "^|Hello,| world!| \u00c7a |va?\n^abc|defghijk|lmnopqrs|tuvwxyz |end")])
def test_word_patches_of_a_hand_made_text(slots, tail, expected):
    """By hand: a patch starts after a spacelike byte that follows a non-spacelike one ("Hello," then " world!",
    "va?" then "\\n"; "\u00c7"'s lead byte is spacelike, its continuation byte is not), after BOS, and after 8
    bytes; a tight budget cuts the tail into 8-byte patches (there a document may start inside a patch)."""
    ids = torch.tensor([[1] + [b + 4 for b in "Hello, world! \u00c7a va?\n".encode()] + [1]
                        + [b + 4 for b in b"abcdefghijklmnopqrstuvwxyz end"]])
    assert ids.size(1) == 54
    patch, slot, first_capped = train_gpt.patch_layout(ids, "space", 8, slots)
    assert first_capped.item() == tail and segments(ids[0], patch[0]) == expected
    assert slot[0, :9].tolist() == [0, 0, 1, 2, 3, 4, 5, 0, 1]


def reference_layout(ids: list[int], P: int, slots: int) -> tuple[list[int], list[int]]:
    """patch_layout written out byte by byte: the rule, the length cap, then the budget's tail."""
    spacelike = [not (0 <= b - 4 < 128 and chr(b - 4).isalnum() or 128 <= b - 4 < 192) for b in ids]
    starts, length = [], 0
    for i in range(len(ids)):
        word = i == 0 or ids[i - 1] == train_gpt.BOS_ID or (spacelike[i - 1] and i >= 2 and not spacelike[i - 2])
        length = 1 if word or length == P else length + 1
        starts.append(length == 1)
    tail = next((i for i in range(len(ids)) if sum(starts[:i + 1]) + math.ceil((len(ids) - 1 - i) / P) > slots),
                len(ids))
    starts = starts[:tail] + [(i - tail) % P == 0 for i in range(tail, len(ids))]
    patch = list(itertools.accumulate(starts))
    slot, last = [], 0
    for i, s in enumerate(starts):
        last = i if s else last
        slot.append(i - last)
    return [p - 1 for p in patch], slot


@pytest.mark.parametrize("P", [3, 8, 12])
def test_word_patches_match_the_rule_written_out_and_keep_every_byte(P):
    """Text and random bytes, budgets from the fewest slots allowed to one per byte: patch_layout equals the rule
    applied byte by byte; every byte has one (patch, slot), slots count up from 0 within a patch, no patch
    exceeds PATCH_MAX or the budget."""
    g = torch.Generator().manual_seed(P)
    rows = [text_ids(96, bos_at=(0, 50)), torch.randint(1, 260, (96,), generator=g), text_ids(96, bos_at=(3,))]
    ids = torch.stack(rows)
    for slots in (math.ceil(96 / P), 20, 40, 96):
        if slots < math.ceil(96 / P):
            continue
        patch, slot, _ = train_gpt.patch_layout(ids, "space", P, slots)
        for row in range(3):
            assert (patch[row].tolist(), slot[row].tolist()) == reference_layout(ids[row].tolist(), P, slots)
        assert patch.max() < slots and slot.max() < P
        flat = patch * P + slot  # distinct within a window: no byte shares a place, none is dropped
        assert all(len(set(r.tolist())) == 96 for r in flat)


def test_fixed_patches_are_every_patch_size_bytes():
    ids = text_ids(64)[None]
    patch, slot, tail = train_gpt.patch_layout(ids, "fixed", 4, 16)
    assert patch[0].tolist() == [i // 4 for i in range(64)] and slot[0].tolist() == [i % 4 for i in range(64)]
    assert tail.item() == 64


TEXT = "Caf\u00e9 au lait, s'il vous pla\u00eet!  x=42; \u00c7a va?\n\u2014 Fin.\t(ok) \u65e5\u672c word-break end."


def text_ids(length: int, bos_at=(0, 21)) -> torch.Tensor:
    """A window of real text: spaces, punctuation, digits, 2- and 3-byte UTF-8, and BOS at the given positions."""
    data = (TEXT * 8).encode()
    ids = torch.tensor([b + train_gpt.BYTE_OFFSET for b in data[:length]])
    ids[list(bos_at)] = train_gpt.BOS_ID
    return ids


@pytest.mark.parametrize("slots", [32, 10])  # 32: room for every word; 10: the tail is cut into PATCH_MAX bytes
@pytest.mark.parametrize("window", [0, 16])
def test_word_patches_are_causal(tiny_args, window, slots):
    """PATCHING=space, every knob on, decoder window on and off: for every byte j, replacing it with a space, a
    letter, a continuation byte or BOS (each moving patch boundaries) leaves the logits of positions <= j
    bit-identical, whether j starts, ends or sits inside a patch."""
    args = tiny_args(**dict(REBALANCED, PATCHING="space", PATCH_MAX=8, DECODER_WINDOW=window, PATCH_SLOTS=slots))
    model = randomize(train_gpt.build_model(args)).eval()
    ids = torch.stack((text_ids(args.window), text_ids(args.window, bos_at=(0, 5, 40))))
    patch, _, tail = train_gpt.patch_layout(ids, "space", args.patch_max, args.patch_slots)
    assert (tail < args.window).any() if slots == 10 else (tail == args.window).all()
    assert patch.max() + 1 > args.window // 8  # more patches than 8-byte ones would give
    base = model.forward_logits(ids)
    for j in range(args.window):
        for byte in (ord(" ") + 4, ord("q") + 4, 0x85 + 4, train_gpt.BOS_ID):
            changed = ids.clone()
            changed[:, j] = byte
            out = model.forward_logits(changed)
            assert torch.equal(out[:, :j + 1], base[:, :j + 1]), f"logits up to {j} moved when byte {j} became {byte}"


def test_word_patches_jepa_terms_skip_the_padding_patches(tiny_args):
    """Under space, the MSE pairs each real patch's prediction with the next real patch's target and SIGReg sees
    the real patches' targets only: both equal the terms over the real patches, selected by hand."""
    args = tiny_args(**WORD_PATCHES)
    model = randomize(train_gpt.build_model(args)).eval()
    ids = torch.stack((text_ids(args.window), text_ids(args.window, bos_at=(0, 5, 40))))
    directions = train_gpt.sigreg_directions(args.latent_dim, 16, 5, torch.device("cpu"))
    with torch.no_grad():
        ce, mse, reg = model(ids, directions)
        patches, predicted, _, patch = model.hidden_states(ids)
        targets = model.projector(patches)
    real = (patch[:, -1] + 1).tolist()
    assert all(8 < n < args.patch_slots for n in real), real  # padding patches after each window's last real one
    pairs = [(predicted[b, :n - 1], targets[b, 1:n]) for b, n in enumerate(real)]
    torch.testing.assert_close(mse, F.mse_loss(torch.cat([p for p, _ in pairs]), torch.cat([t for _, t in pairs])))
    torch.testing.assert_close(reg, train_gpt.sigreg(torch.cat([targets[b, :n] for b, n in enumerate(real)]),
                                                     directions))


def test_knobs_off_reproduce_the_reference_model(tiny_args):
    """With every issue-9 knob at its off value, the model is the one before them, bit for bit: values
    recorded from commit 5d1224c (same seed, same inputs; the zero-initialised matrices given the same
    Gaussian values by `realistic`)."""
    args = tiny_args(DECODER_DIM=32, DECODER_WINDOW=0, LATENT_PER_SLOT=0, LATENT_INJECT_LAYERS=1, LATENT_NORM=0,
                     NGRAM_BUCKETS=0, SMEAR_GATE=0)
    model = realistic(train_gpt.build_model(args))
    assert sum(p.numel() for p in model.parameters()) == 58_774
    ids = torch.randint(4, 260, (2, args.window), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model.forward_logits(ids)
        ce, mse, reg = model(ids, train_gpt.sigreg_directions(args.latent_dim, 16, 5, torch.device("cpu")))
    assert logits.sum().item() == pytest.approx(-7.687495708465576, rel=1e-4)
    assert logits.abs().sum().item() == pytest.approx(2996.312255859375, rel=1e-5)
    assert logits[0, 5, :3].tolist() == pytest.approx([0.11958751, -0.04945107, -0.01601493], rel=1e-4)
    assert (ce.item(), mse.item(), reg.item()) == pytest.approx((5.572495937, 0.067343249, 0.185410514), rel=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("T,window", [(64, 16), (70, 16), (64, 1), (64, 63), (64, 64), (64, 200)])
def test_local_attention_matches_dense_masked_attention(T, window, kv_heads):
    """Values and gradients of the blockwise and full paths equal dense SDPA under the sliding-window causal mask,
    GQA included: query head h reads key/value head h // (4 / kv_heads), copied here by hand."""
    g = torch.Generator().manual_seed(T + window)
    q = torch.randn(2, 4, T, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, T, 8, generator=g, requires_grad=True) for _ in range(2))
    i = torch.arange(T)
    mask = (i[None] <= i[:, None]) & (i[:, None] - i[None] < window)
    shared = [h * kv_heads // 4 for h in range(4)]
    reference = torch.nn.functional.scaled_dot_product_attention(q, k[:, shared], v[:, shared], attn_mask=mask)
    out = train_gpt.local_causal_attention(q, k, v, window)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad((out * reference.detach()).sum(), (q, k, v))
    expected = torch.autograd.grad((reference * reference.detach()).sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not FLEX_ON_CPU, reason="FlexAttention compiles for the CPU from torch 2.6 on; tests/test_cuda.py "
                    "covers the GPU")
@pytest.mark.parametrize("head", [16, 24])
def test_flex_window_attention_matches_dense_masked_attention(head):
    """The CUDA kernel path (FlexAttention with a sliding-window block mask), forward on the CPU; a head size of
    24 is zero-padded to 32 inside, and the scale stays 1/sqrt(24)."""
    T, window = 256, 48
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, T, head, generator=g) for _ in range(3))
    i = torch.arange(T)
    mask = (i[None] <= i[:, None]) & (i[:, None] - i[None] < window)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with torch.no_grad():
        torch.testing.assert_close(train_gpt.flex_window_attention(q, k, v, window), reference, rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("kernel", ["cpu", "flex"] if FLEX_ON_CPU else ["cpu"])
@pytest.mark.parametrize("patching", ["fixed", "space"])
def test_training_and_scoring_graphs_have_no_graph_break(tiny_args, monkeypatch, patching, kernel):
    """Every torch.compile here has fullgraph=True, so a break would stop a GPU run at its first compile: dynamo
    traces the training forward (losses) and the scoring forward in one graph each, with a windowed decoder, on the
    CPU's attention and on FlexAttention, the CUDA kernel (scoring only: it has no backward on the CPU)."""
    args = tiny_args(DECODER_WINDOW=16, **(WORD_PATCHES if patching == "space" else {}))
    model = train_gpt.build_model(args)
    ids = torch.randint(0, 260, (2, args.window), generator=torch.Generator().manual_seed(0))
    if kernel == "flex":
        local = train_gpt.local_causal_attention
        monkeypatch.setattr(train_gpt, "local_causal_attention", lambda q, k, v, window: local(q, k, v, window)
                            if window >= q.size(-2) else train_gpt.flex_window_attention(q, k, v, window))
        with torch.no_grad():
            graphs = [torch._dynamo.explain(model.forward_logits)(ids)]
    else:
        directions = train_gpt.sigreg_directions(args.latent_dim, args.sigreg_slices, 0, torch.device("cpu"))
        graphs = [torch._dynamo.explain(model)(ids, directions), torch._dynamo.explain(model.forward_logits)(ids)]
    for explained in graphs:
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_residual_streams_are_bf16_under_autocast_and_the_scores_stay_close(tiny_args):
    """CUDA trains under bf16 autocast: both streams, the encoder's and the decoder's, run in bf16 through every block
    (half the bytes per elementwise op), while the logits are float32; the loss stays within 0.1% of float32's.
    The CPU has no autocast here, so the same blocks stay float32 (the golden tests pin those values)."""
    args = tiny_args(DECODER_WINDOW=16)
    model = randomize(train_gpt.build_model(args), std=0.1)
    ids = torch.randint(0, 260, (2, args.window), generator=torch.Generator().manual_seed(0))
    streams = []
    for block in (*model.blocks, *model.dec_blocks):
        block.register_forward_hook(lambda module, inputs, output: streams.append((inputs[0].dtype, output.dtype)))
    exact = model.forward_logits(ids)
    assert set(streams) == {(torch.float32, torch.float32)}
    streams.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.forward_logits(ids)
    assert set(streams) == {(torch.bfloat16, torch.bfloat16)} and len(streams) == 2 * 2 + 1  # 2 blocks x 2, 1
    assert logits.dtype == torch.float32
    ce, ce_exact = (F.cross_entropy(x.flatten(0, 1), ids.flatten()).item() for x in (logits, exact))
    assert ce == pytest.approx(ce_exact, rel=1e-3)


def test_ngram_buckets_hash_exactly_the_bytes_ending_at_each_position():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 260, (2, 40), generator=g)
    buckets = train_gpt.ngram_buckets(ids, 1000)
    assert buckets.shape == (2, 40, 3) and buckets.min() >= 0 and buckets.max() < 1000
    for t in (0, 1, 3, 17, 39):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] - 3) % 256 + 4
        moved = (train_gpt.ngram_buckets(changed, 1000) != buckets).any(0)  # (40, 3)
        for n in (2, 3, 4):  # the n-gram ending at s covers s-n+1..s
            covers = [t <= s < t + n for s in range(40)]
            assert moved[:, n - 2].tolist() == covers, (t, n)
    # bytes before the window read as BOS; a byte's n-grams do not depend on where the window starts
    padded = torch.cat((torch.full((2, 3), train_gpt.BOS_ID), ids), dim=1)
    assert torch.equal(train_gpt.ngram_buckets(padded, 1000)[:, 3:], buckets)
    assert torch.equal(train_gpt.ngram_buckets(ids[:, 5:], 1000)[:, 3:], buckets[:, 8:])


def test_smear_gate_starts_closed_and_stays_shut_at_document_starts():
    gate = train_gpt.SmearGate(4)
    x = torch.randn(1, 6, 4)
    ids = torch.tensor([[9, 9, train_gpt.BOS_ID, 9, 9, 9]])
    assert torch.equal(gate(x, ids), x)
    with torch.no_grad():
        gate.mix.fill_(0.5)
        gate.weight.copy_(torch.tensor([1.0, -1.0, 0.5, 0.0]))
    out = gate(x, ids)
    share = 0.5 * torch.sigmoid(x[0] @ gate.weight)
    for i in range(6):
        expected = x[0, i] if i == 0 or i == 2 else x[0, i] + share[i] * x[0, i - 1]
        torch.testing.assert_close(out[0, i], expected)


def test_latent_conditioning_per_slot_and_injected(tiny_args):
    """Per slot: slot s of patch p receives part s of its patch's projection. Injected layers get their own
    zero-initialised projections; with LATENT_NORM the input projection starts at zero too."""
    args = tiny_args(DECODER_LAYERS=2, LATENT_PER_SLOT=1, LATENT_INJECT_LAYERS=2, LATENT_NORM=1)
    model = train_gpt.build_model(args)
    assert not model.latent_in.weight.any() and not model.latent_inject[0].weight.any()
    randomize(model)
    latents = torch.randn(1, 3, args.latent_dim)
    layout = model.layout(torch.zeros(1, 3 * args.patch_size, dtype=torch.long))
    conds = model.conditioning(latents, *layout)
    assert len(conds) == 2 and conds[0].shape == (1, 3 * args.patch_size, 32)
    normed = train_gpt.rms_norm(latents)
    for p in range(3):
        parts = model.latent_in(normed[:, p]).view(args.patch_size, 32)
        torch.testing.assert_close(conds[0][0, p * args.patch_size:(p + 1) * args.patch_size], parts)
    shared = train_gpt.build_model(tiny_args(LATENT_PER_SLOT=0, LATENT_INJECT_LAYERS=1, LATENT_NORM=0))
    assert torch.equal(shared.conditioning(latents, *layout)[0][0, :4], shared.latent_in(latents)[0, :1].expand(4, -1))


def test_latent_reaches_the_first_inject_layers_blocks(tiny_args):
    """Block 0 reads the byte embedding plus the input projection; blocks 1..LATENT_INJECT_LAYERS-1 read the
    previous block's output plus their own projection; later blocks read the previous output alone."""
    args = tiny_args(DECODER_LAYERS=3, LATENT_INJECT_LAYERS=2, NGRAM_BUCKETS=0, SMEAR_GATE=0)
    model = randomize(train_gpt.build_model(args)).eval()
    inputs = []
    for block in model.dec_blocks:
        block.register_forward_hook(lambda m, a, out: inputs.append((a[0], out)))
    ids = torch.randint(4, 260, (1, args.window), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, predicted, _, _ = model.hidden_states(ids)
        start = model.start_latent.expand(1, 1, -1)
        conds = model.conditioning(torch.cat((start, predicted[:, :-1]), dim=1), *model.layout(ids))
        prev = torch.nn.functional.pad(ids[:, :-1], (1, 0), value=train_gpt.BOS_ID)
    assert len(conds) == 2 and len(inputs) == 3
    torch.testing.assert_close(inputs[0][0], model.dec_emb(prev) + conds[0])
    torch.testing.assert_close(inputs[1][0], inputs[0][1] + conds[1])
    torch.testing.assert_close(inputs[2][0], inputs[1][1])


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


@pytest.mark.parametrize("ngrams", [0, 97])
def test_patch_embedding_reads_only_its_own_patch_and_the_ngrams_ending_in_it(tiny_args, ngrams):
    """Byte 5 (patch 1 of bytes 4..7) reaches patch 1, and with n-grams up to 4 bytes long also patch 2, whose
    first byte ends a 4-gram starting at byte 5; never an earlier patch."""
    args = tiny_args(NGRAM_BUCKETS=ngrams)
    model = randomize(train_gpt.build_model(args))
    ids = torch.randint(4, 260, (1, args.window))
    changed = ids.clone()
    changed[0, 5] += 1
    a, b = (model.embed_patches(x, *model.layout(x)) for x in (ids, changed))
    differs = (a - b).abs().amax(dim=-1)[0] > 0
    assert differs.tolist() == [i == 1 or (ngrams and i == 2) for i in range(args.window // args.patch_size)]


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


@pytest.mark.parametrize("size", ["tiny", "default", "rebalanced", "recipe", "space"])
@pytest.mark.parametrize("training", [True, False])
def test_flops_per_byte_match_flop_counter(tiny_args, monkeypatch, size, training):
    if size == "default":
        args = default_args(monkeypatch)
    else:  # grouped-query attention in the encoder
        knobs = dict(rebalanced=REBALANCED, recipe=RECIPE, space=WORD_PATCHES).get(size, {})
        args = tiny_args(NUM_HEADS=4, NUM_KV_HEADS=2, **knobs)
    analytic = train_gpt.flops_per_byte(args, training)
    attention = analytic["encoder_attention"] + analytic["decoder_attention"]
    linear, counted_attention = counted_flops(args, training)
    assert linear == pytest.approx(sum(analytic.values()) - attention, rel=0.01)
    # the counter's dense encoder attention is the causal count scaled by n^2 / (n (n+1) / 2) for n queries; the
    # decoder's is T^2 keys, or with a window W, blocks of W queries against 2W keys (the analytic count is the
    # causal window's: query i meets min(i+1, W) keys)
    patches, T = args.patch_slots, args.window
    W = args.decoder_window if args.decoder_window < T else 0  # a window as long as the sequence is no window
    keys = T * T if not W else -(-T // W) * W * 2 * W
    decoder = (3 if training else 1) * args.decoder_layers * 4 * args.decoder_dim * keys / args.train_seq_len
    windowed = sum(min(i + 1, W or T) for i in range(T))
    assert analytic["decoder_attention"] == pytest.approx(decoder / keys * windowed)
    dense = analytic["encoder_attention"] * 2 * patches / (patches + 1) + decoder
    assert counted_attention == pytest.approx(dense, rel=0.01)


def test_sigreg_projection_flops_match_the_counter_to_the_flop(tiny_args):
    """SIGReg's projection on fixed directions is the only term that grows with SIGREG_SLICES (forward and the backward
    to z: 2 x 2 x patches x latent x slices a window): between 16 and 1040 slices the analytic count and flop_counter's
    grow by the same FLOPs, exactly (the 1% tolerance on the whole count above is wider than this term)."""
    few, many = (tiny_args(SIGREG_SLICES=s) for s in (16, 1040))
    analytic = [sum(train_gpt.flops_per_byte(a, training=True).values()) for a in (few, many)]
    counted = [sum(counted_flops(a, training=True)) for a in (few, many)]
    patches = few.window // few.patch_size
    assert analytic[1] - analytic[0] == pytest.approx(2 * 2 * patches * few.latent_dim * 1024 / few.train_seq_len,
                                                      rel=1e-12)
    assert counted[1] - counted[0] == pytest.approx(analytic[1] - analytic[0], rel=1e-9)


def test_flops_per_byte_by_hand(monkeypatch):
    """Counted by hand per target byte (d=480, 2048-byte window, 256 patches). The reference: decoder matmuls
    7 x 16 d^2 (q, k, v, proj 8 d^2, MLP 8 d^2) + latent_in 2 x 192 x 480 / 8, decoder attention 7 x 4 d x
    (2048 x 2049 / 2) / 2047; 135.0 M a training step. The default: the latent through two per-slot projections
    2 x 2 x 192 x 480 a byte, attention over a 128-byte window (query i meets min(i+1, 128) keys), n-grams
    2 x 120 x (480 + 480) a byte; 100.4 M a training step."""
    d = 480
    f = train_gpt.flops_per_byte(default_args(monkeypatch, **REFERENCE), training=False)
    assert f["decoder_blocks"] == pytest.approx((7 * 16 * d * d * 2048 + 2 * 192 * d * 256) / 2047)
    assert f["decoder_attention"] == pytest.approx(7 * 4 * d * 2048 * 2049 / 2 / 2047)
    assert round(sum(train_gpt.flops_per_byte(default_args(monkeypatch, **REFERENCE), True).values()) / 1e6, 1) == 135.0
    f = train_gpt.flops_per_byte(default_args(monkeypatch), training=False)
    assert f["decoder_blocks"] == pytest.approx((7 * 16 * d * d * 2048 + 2 * 2 * 192 * d * 2048) / 2047)
    assert f["decoder_attention"] == pytest.approx(7 * 4 * d * (128 * 129 / 2 + (2048 - 128) * 128) / 2047)
    assert f["ngram_embeddings"] == pytest.approx(2 * 120 * 2 * d * 2048 / 2047)
    assert round(sum(train_gpt.flops_per_byte(default_args(monkeypatch), True).values()) / 1e6, 1) == 100.4


# the issue-10 model knob on: the soft-cap adds no matmul (it is elementwise), which the flop-counter test above checks
RECIPE = dict(LOGIT_SOFTCAP=30, DECODER_LAYERS=3)


def test_the_byte_loss_alone_trains_the_predictor(tiny_args):
    """With JEPA_WEIGHT=0 (the default) the predictor stays: it is the decoder's conditioning path, so the byte CE
    reaches every one of its weights through the decoder."""
    args = tiny_args()
    assert args.jepa_weight == 0.0
    model = randomize(train_gpt.build_model(args))
    ce = model(torch.randint(4, 260, (2, args.window), generator=torch.Generator().manual_seed(3)))[0]
    ce.backward()
    for name, p in model.predictor.named_parameters():
        assert p.grad is not None and p.grad.abs().min() > 0, name


def test_logit_softcap_bounds_the_logits_smoothly(tiny_args):
    """LOGIT_SOFTCAP=c: the logits are c*tanh(z/c) of the uncapped ones, in training and evaluation alike."""
    args = tiny_args(LOGIT_SOFTCAP=2.0)
    capped = randomize(train_gpt.build_model(args), std=1.0)
    plain = train_gpt.build_model(tiny_args(LOGIT_SOFTCAP=0))
    plain.load_state_dict(capped.state_dict())
    ids = torch.randint(4, 260, (2, args.window))
    with torch.no_grad():
        z, out = plain.forward_logits(ids), capped.forward_logits(ids)
        ce = capped(ids)[0]
    assert z.abs().max() > 4.0 and out.abs().max() <= 2.0
    torch.testing.assert_close(out, 2.0 * torch.tanh(z / 2.0))
    expected = torch.nn.functional.cross_entropy(out[:, 1:].reshape(-1, 260), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(ce, expected)


def test_recipe_model_is_causal(tiny_args):
    """Every issue-10 model knob on: the logits of positions <= j do not move when byte j changes."""
    args = tiny_args(**RECIPE)
    model = randomize(train_gpt.build_model(args)).eval()
    ids = torch.randint(4, 260, (2, args.window), generator=torch.Generator().manual_seed(1))
    assert_causal(model, ids, range(args.window))
