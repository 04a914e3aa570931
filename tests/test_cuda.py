"""GPU checks (skipped without CUDA): the compiled bf16 forward against a float32 reference at the real head sizes,
and a short training run of the full default model in a temporary directory, printing ms/step, MFU and peak memory
(its log is copied to logs/); a diverged run stops within two steps although the clock reads the loss a step late."""
import json
import math
import shutil
import time

import numpy as np
import pytest
import torch

import train_gpt
from conftest import DIVERGING_LRS, ROOT, one_error_line, realistic, run_script, tiny_env

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# the default widths and head counts (encoder heads of 80, GQA 6/3; decoder heads of 120), fewer layers
REAL_HEADS = dict(MODEL_DIM=480, NUM_HEADS=6, NUM_KV_HEADS=3, DECODER_HEADS=4, LATENT_DIM=192, PATCH_SIZE=8,
                  TRAIN_SEQ_LEN=2047, NUM_LAYERS=2, ENCODER_REPEATS=2, DECODER_LAYERS=2, TRAIN_BATCH_TOKENS=16376,
                  VAL_BATCH_SIZE=16376, TTT_CHUNK_TOKENS=32768, DEVICE="cuda")


def test_compiled_bf16_logits_match_a_float32_math_reference(tiny_args):
    """Tolerance: bf16 keeps 8 bits of mantissa, so logits of unit scale move by ~1e-2 through a few layers; a
    wrong mask, head split or rotary would move them by their own scale (~1)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args = tiny_args(**REAL_HEADS)
    model = realistic(train_gpt.build_model(args), std=0.05).cuda().eval()
    ids = torch.randint(4, 260, (2, args.window), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.inference_mode():
        with sdpa_kernel(SDPBackend.MATH):
            reference = model.forward_logits(ids)  # float32 throughout
        with torch.autocast("cuda", dtype=torch.bfloat16):
            compiled = torch.compile(model.forward_logits, dynamic=False)(ids)
    scale = reference.std().item()
    assert scale > 0.3, "the reference logits must carry signal for the comparison to mean anything"
    err = (compiled - reference).abs()
    assert err.mean().item() < 0.02 * scale and err.max().item() < 0.25 * scale, (err.mean().item(), scale)


def test_flex_window_attention_matches_dense_masked_sdpa_with_gradients():
    """The decoder's CUDA kernel at the default's head size: FlexAttention's sliding-window block mask against
    dense SDPA under the same mask, values and gradients, in bf16."""
    T, window = 2048, 512
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, T, 120, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    i = torch.arange(T, device="cuda")
    mask = (i[None] <= i[:, None]) & (i[:, None] - i[None] < window)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = train_gpt.local_causal_attention(q, k, v, window)
    torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2)
    for got, want in zip(torch.autograd.grad(out.float().square().sum(), (q, k, v)),
                         torch.autograd.grad(reference.float().square().sum(), (q, k, v))):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)


def test_full_default_model_trains_in_bf16(tmp_path):
    """The full default model, one process (8 accumulation steps a step), compile on, random bytes, 30 steps with a
    warmdown over the last 10: late QAT (on here; off by default) switches on for the last step or two."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for name, n in (("fineweb_train_000000.bin", 20_000_000), ("fineweb_val_000000.bin", 300_001)):
        tokens = rng.integers(4, 260, size=n).astype(np.uint16)
        tokens[::2048] = train_gpt.BOS_ID
        train_gpt.write_shard(data / name, tokens)
    (data / "tokenizer.json").write_text(json.dumps(train_gpt.PURE_BYTE_TOKENIZER))
    run_id = f"cuda_full_default_{time.strftime('%Y%m%d_%H%M%S')}"
    env = dict(DATA_PATH=str(data), TOKENIZER_PATH=str(data / "tokenizer.json"), DEVICE="cuda", ITERATIONS="30",
               WARMDOWN_ITERS="10", WARMUP_STEPS="4", MAX_WALLCLOCK_SECONDS="0", TRAIN_LOG_EVERY="5",
               LATE_QAT_THRESHOLD="0.15",
               TTT_ENABLED="0", USE_COMPILE="1", OMP_NUM_THREADS="4")
    run = run_script(tmp_path / "run", env, run_id=run_id, timeout=900)
    (ROOT / "logs").mkdir(exist_ok=True)
    shutil.copy(run.cwd / "logs" / f"{run_id}.txt", ROOT / "logs" / f"{run_id}.txt")
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    assert run.lines("model_params:27074651")
    qat = int(run.lines("late_qat: on at step:")[0].split("step:")[1].split()[0])
    assert 25 <= qat < 30, "QAT belongs to the warmdown's tail"
    steps = [line for line in run.lines("step:") if "train_loss" in line]
    losses = [float(line.split("train_loss:")[1].split()[0]) for line in steps]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    peak = int(run.lines("peak memory allocated:")[0].split(":")[1].split()[0])
    assert peak < 80_000, "the full model must fit an 80 GB H100 with 8-step accumulation"
    assert run.lines("rate_control: step 0") and run.lines("final_int6_lzma_roundtrip_exact")
    last = run.lines("step:30/30 train_loss")[0]
    mfu = f"{run.value('step:30/30 train_loss', 'mfu')}%" if "mfu:" in last else "unknown card"
    print(f"{torch.cuda.get_device_name()}: step_avg {run.value('step:30/30 train_loss', 'step_avg'):.1f} ms, "
          f"MFU {mfu}, peak {peak} MiB (log logs/{run_id}.txt)")


def test_a_diverged_cuda_run_stops_within_two_steps(corpus, tmp_path):
    """On CUDA the clock reads step n-1's loss (copied to pinned memory as that step ended) once step n is queued, so
    no step waits for the device: the run still stops within 2 steps of the first non-finite loss, exit 5."""
    run = run_script(tmp_path, tiny_env(corpus, DEVICE="cuda", USE_COMPILE=0, **DIVERGING_LRS), run_id="diverged")
    line = one_error_line(run)
    losses = {int(step_line.split("/")[0][5:]): float(step_line.split("train_loss:")[1].split()[0])
              for step_line in run.lines("step:") if "train_loss:" in step_line}
    first = min(step for step, loss in losses.items() if not math.isfinite(loss))
    assert run.proc.returncode == 5 and max(losses) <= first + 2 and line.startswith("error: training diverged: ")
