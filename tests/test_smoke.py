"""The embedded default: the README's second Quick-start command, shortened, on the pydoc sample."""
import json

import pytest

from conftest import run_script


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    env = dict(SMOKE="1", ITERATIONS="6", TRAIN_LOG_EVERY="2", TTT_CHUNK_TOKENS="16384", VAL_SLIDING_STRIDE="256")
    return run_script(tmp_path_factory.mktemp("smoke"), env, run_id="smoke")


def test_embedded_default_runs_the_whole_pipeline(smoke_run):
    run = smoke_run
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    assert run.lines("data: EMBEDDED SAMPLE")
    assert (run.cwd / "data/datasets/embedded_pydoc_byte260/fineweb_train_000000.bin").is_file()
    assert (run.cwd / "final_model.int6.ptz").is_file()
    for line in ("weight_avg:ema", "gptq_calibration:", "Serialized model int6+lzma:", "final_prequant_exact",
                 "final_int6_lzma_roundtrip_exact", "final_ttt_exact", "ttt_targets_scored:", "eval_total_time:"):
        assert run.lines(line), line
    assert run.lines("ttt_targets_scored:")[0].endswith(" ok")


def test_submission_json_holds_the_run_s_own_figures(smoke_run):
    run = smoke_run
    info = json.loads((run.cwd / "logs" / "smoke.submission.json").read_text())
    assert info["val_bpb"] == pytest.approx(run.value("final_ttt_exact", "val_bpb"), abs=1e-8)
    assert info["val_loss"] == pytest.approx(run.value("final_ttt_exact", "val_loss"), abs=1e-8)
    assert info["pre_quant_val_bpb"] == pytest.approx(run.value("final_prequant_exact", "val_bpb"), abs=1e-8)
    total = int(run.lines("Total submission size int6+lzma:")[0].split(":")[1].split()[0])
    assert info["bytes_total"] == total == info["bytes_model_int6_lzma"] + info["bytes_code"]
    assert info["bytes_model_int6_lzma"] == (run.cwd / "final_model.int6.ptz").stat().st_size
    assert info["step_stop"] == 6 and info["track"] == "non_record" and "CPU" in info["hardware"]
    assert set(info) >= {"name", "blurb", "date", "track", "val_loss", "val_bpb", "pre_quant_val_loss",
                         "pre_quant_val_bpb", "step_stop", "wallclock_seconds", "bytes_total",
                         "bytes_model_int6_lzma", "bytes_code", "hardware"}
