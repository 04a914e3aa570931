"""GPU checks (skipped without CUDA): flash attention under compile, bf16 training of the full default model,
its peak memory and step time on one GPU with 8-step accumulation (the run's log lands in logs/)."""
import json
import time

import numpy as np
import pytest
import torch

import train_gpt
from conftest import ROOT, run_script

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_compiled_flash_attention_matches_eager(tiny_args):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args = tiny_args(MODEL_DIM=128, NUM_HEADS=2, NUM_KV_HEADS=1, DECODER_HEADS=2)
    model = train_gpt.build_model(args).cuda().eval()
    ids = torch.randint(4, 260, (4, args.window), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model.forward_logits(ids)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # fails loudly if flash cannot serve these shapes
            compiled = torch.compile(model.forward_logits)(ids)
    assert torch.isfinite(compiled).all()
    torch.testing.assert_close(compiled, eager, atol=5e-2, rtol=5e-2)


def test_full_default_model_trains_in_bf16_within_memory(tmp_path):
    """Full default configuration, one process (8 accumulation steps a step), compile on, random bytes."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for name, n in (("fineweb_train_000000.bin", 12_000_000), ("fineweb_val_000000.bin", 300_001)):
        tokens = rng.integers(4, 260, size=n).astype(np.uint16)
        tokens[::2048] = train_gpt.BOS_ID
        train_gpt.write_shard(data / name, tokens)
    (data / "tokenizer.json").write_text(json.dumps(train_gpt.PURE_BYTE_TOKENIZER))
    run_id = f"cuda_full_default_{time.strftime('%Y%m%d_%H%M%S')}"
    env = dict(DATA_PATH=str(data), TOKENIZER_PATH=str(data / "tokenizer.json"), ITERATIONS="20",
               WARMUP_STEPS="3", MAX_WALLCLOCK_SECONDS="0", TRAIN_LOG_EVERY="5", TTT_ENABLED="0",
               USE_COMPILE="1", OMP_NUM_THREADS="4")
    run = run_script(ROOT, env, run_id=run_id, timeout=900)
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    assert run.lines("model_params:24593530")
    losses = [float(line.split("train_loss:")[1].split()[0]) for line in run.lines("step:") if "train_loss" in line]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    peak = int(run.lines("peak memory allocated:")[0].split(":")[1].split()[0])
    assert peak < 80_000, "the full model must fit an 80 GB H100 with 8-step accumulation"
    step_avg = run.value("step:20/20 train_loss", "step_avg")
    print(f"{torch.cuda.get_device_name()}: step_avg {step_avg:.1f} ms, peak {peak} MiB (log logs/{run_id}.txt)")
