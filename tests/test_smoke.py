"""The embedded default: the README's second Quick-start command, shortened, on the pydoc sample."""
import json
import math

import pytest

import train_gpt
from conftest import SCRIPT, run_script

# DEVICE empty = auto, as a user types the command: SMOKE=1 may run on the CPU without asking
SMOKE_ENV = dict(SMOKE="1", DEVICE="", ITERATIONS="6", TRAIN_LOG_EVERY="2", TTT_CHUNK_TOKENS="16384",
                 VAL_SLIDING_STRIDE="256")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    return run_script(tmp_path_factory.mktemp("smoke"), SMOKE_ENV, run_id="smoke")


def test_embedded_default_runs_the_whole_pipeline(smoke_run):
    run = smoke_run
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    assert run.lines("data: EMBEDDED SAMPLE")
    assert (run.cwd / "data/datasets/embedded_pydoc_byte260/fineweb_train_000000.bin").is_file()
    assert (run.cwd / "final_model.int6.ptz").is_file()
    for line in ("weight_avg:ema", "gptq_calibration:", "flops_per_byte train:", "size_estimate: weights at step",
                 "rate_control: step 0:", "Serialized model int6+lzma:", "final_prequant_exact",
                 "final_int6_lzma_roundtrip_exact", "final_ttt_exact", "ttt_targets_scored:", "eval_total_time:"):
        assert run.lines(line), line
    assert run.lines("ttt_targets_scored:")[0].endswith(" ok")


def test_submission_json_and_scores_agree_with_the_files_on_disk(smoke_run, monkeypatch):
    """Checked against what the run left on disk, not against its own log: the sizes are the files' sizes, and
    the round-trip score is recomputed here from the artifact file; the reported score is TTT's, and the
    round trip stays within 0.01 bpb of the pre-quantisation score."""
    run = smoke_run
    info = json.loads((run.cwd / "logs" / "smoke.submission.json").read_text())
    artifact = run.cwd / "final_model.int6.ptz"
    assert info["bytes_model_int6_lzma"] == artifact.stat().st_size
    assert info["bytes_code"] == len(SCRIPT.read_bytes())
    assert info["bytes_total"] == info["bytes_model_int6_lzma"] + info["bytes_code"]
    assert info["step_stop"] == 6 and info["track"] == "non_record" and "CPU" in info["hardware"]
    assert set(info) >= {"name", "blurb", "date", "track", "val_loss", "val_bpb", "pre_quant_val_loss",
                         "pre_quant_val_bpb", "step_stop", "wallclock_seconds", "bytes_total",
                         "bytes_model_int6_lzma", "bytes_code", "hardware"}
    for k, v in SMOKE_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(run.cwd)
    args = train_gpt.Hyperparameters()
    rt = train_gpt.Runtime(args)
    val = train_gpt.load_validation_tokens(args)
    recomputed = train_gpt.evaluate_standard(train_gpt.load_artifact(artifact, args), val, args, rt)
    assert recomputed.targets == len(val) - 1
    assert recomputed.bpb == pytest.approx(run.value("final_int6_lzma_roundtrip_exact", "val_bpb"), abs=2e-8)
    assert info["val_bpb"] == pytest.approx(run.value("final_ttt_exact", "val_bpb"), abs=1e-8)
    assert abs(recomputed.bpb - info["pre_quant_val_bpb"]) < 0.01
    uniform = math.log2(260) * (len(val) - 1) / int((val[1:] >= 4).sum())  # every byte at probability 1/260
    assert 0 < info["val_bpb"] < uniform - 0.05, (info["val_bpb"], uniform)  # 6 steps and TTT learned something
