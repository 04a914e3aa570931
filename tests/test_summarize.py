"""tools/summarize.py against logs of real tiny runs of train_gpt.py, and against flawed copies of them: the table
carries the logs' exact lines, flawed runs are flagged and left out of the means, the t-test agrees with a closed
form and with scipy, and submission.json holds only what the logs say."""
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SEEDS

sys.path.insert(0, str(ROOT / "tools"))
import summarize  # noqa: E402

TOOL = ROOT / "tools" / "summarize.py"
@pytest.fixture(scope="module")
def seed_logs(seed_runs) -> Path:
    """The folder of the three real tiny runs differing only in SEED (conftest's seed_runs)."""
    return seed_runs[1].cwd / "logs"


@pytest.fixture(scope="module")
def capped_log(over_cap_run) -> Path:
    """A fourth seed of the same configuration, run under a lowered size cap: train_gpt.py stops at the size check."""
    assert over_cap_run.proc.returncode == 3 and over_cap_run.lines("!!! SIZE CAP EXCEEDED"), over_cap_run.proc.stderr
    return over_cap_run.cwd / "logs" / "tiny_s4.txt"


def logged(path: Path, pattern: str) -> tuple:
    """The groups of the last line of a log matching `pattern`: the test's own reading of the log."""
    hits = re.findall(pattern, path.read_text(), flags=re.M)
    assert hits, pattern
    return hits[-1]


def exact(path: Path, label: str) -> tuple[float, float]:
    loss, bpb = logged(path, rf"^{label}_exact val_loss:(\S+) val_bpb:(\S+)$")
    return float(loss), float(bpb)


def copy_logs(src: Path, dst: Path, seeds=SEEDS) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        shutil.copy(src / f"tiny_s{seed}.txt", dst / f"tiny_s{seed}.txt")
    return dst


def edit(path: Path, pattern: str, replacement: str) -> None:
    """Rewrites the lines matching `pattern` in place; fails if none did, so a flaw is never silently absent."""
    text, count = re.subn(pattern, replacement, path.read_text(), flags=re.M)
    assert count, pattern
    path.write_text(text)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=60)


def row_of(stdout: str, run_id: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith(run_id + " "))


def table(stdout: str) -> dict[str, dict[str, str]]:
    """The printed table, cut at the header's column starts: run id -> column -> cell."""
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("run "))
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    rows = {}
    for line in lines[lines.index(header) + 1:]:
        if not line or line.startswith(("seeds averaged", "==")):
            break
        cells = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]
        rows[cells[0]] = dict(zip(names, cells))
    return rows


def test_table_carries_each_log_s_exact_lines(seed_logs):
    out = cli(seed_logs)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("== configuration") == 1
    rows = table(out.stdout)
    assert sorted(rows) == ["tiny_s1", "tiny_s2", "tiny_s3"]
    for seed in SEEDS:
        path, row = seed_logs / f"tiny_s{seed}.txt", rows[f"tiny_s{seed}"]
        for label, column in (("final_prequant", "prequant_bpb"), ("final_int6_lzma_roundtrip", "roundtrip_bpb"),
                              ("final_ttt", "ttt_bpb")):
            assert row[column] == logged(path, rf"^{label}_exact val_loss:\S+ val_bpb:(\S+)$"), label
        assert row["sliding_bpb"] == "-"  # SLIDING_EVAL is off: unknown, not zero
        assert row["artifact"] == logged(path, r"^Serialized model \S+: (\d+) bytes")
        assert row["code"] == logged(path, r"^Code size: (\d+) bytes")
        assert row["total"] == logged(path, r"^Total submission size \S+: (\d+) bytes")
        assert [row["steps"], row["ms/step"]] == list(logged(path, r"^step:(\d+)/\d+ .*step_avg:([0-9.]+)ms"))
        assert row["hardware"] == logged(path, r"^hardware: (.*)$")
        assert float(row["eval_s"]) == pytest.approx(int(logged(path, r"^eval_total_time:(\d+)ms")) / 1000, abs=0.05)
        assert (row["seed"], row["stop"], row["flags"]) == (str(seed), "iterations", "ok")


def test_seed_summary_and_p_value_match_an_independent_computation(seed_logs):
    scipy_stats = pytest.importorskip("scipy.stats")
    bpbs = [exact(seed_logs / f"tiny_s{s}.txt", "final_ttt")[1] for s in SEEDS]
    losses = [exact(seed_logs / f"tiny_s{s}.txt", "final_ttt")[0] for s in SEEDS]
    reference = max(bpbs) + 0.01
    margin = 0.005 / math.log(2)
    out = cli(seed_logs, "--reference", reference)
    assert out.returncode == 0, out.stderr
    assert f"val_bpb: mean {statistics.fmean(bpbs):.8f}  std {statistics.stdev(bpbs):.8f}" in out.stdout
    assert f"val_loss: mean {statistics.fmean(losses):.8f}  std {statistics.stdev(losses):.8f}" in out.stdout
    expected = scipy_stats.ttest_1samp(bpbs, reference - margin, alternative="less").pvalue
    assert "by > 0.0072135 bpb): t = " in out.stdout
    printed = float(re.search(r"by > 0\.0072135 bpb\): t = \S+, df = 2, p = (\S+)", out.stdout).group(1))
    assert printed == pytest.approx(expected, rel=1e-5)  # printed to 6 significant digits
    test = summarize.one_sided_t_test(bpbs, reference, margin)
    assert test["p_value"] == pytest.approx(expected, rel=1e-9) and test["df"] == 2
    assert "warning" not in out.stdout


def test_t_test_against_a_hand_computation():
    # n = 3, mean 1.21, sd 0.01: t = (1.25 - 0.0072135 - 1.21) / (0.01 / sqrt 3) = 5.678793;
    # Student t with 2 df has the closed form P(T >= t) = 1/2 - t / (2 sqrt(t^2 + 2)) = 0.0148187
    test = summarize.one_sided_t_test([1.20, 1.21, 1.22], 1.25, 0.005 / math.log(2))
    t = (1.25 - 0.005 / math.log(2) - 1.21) / (0.01 / math.sqrt(3))
    assert test["t"] == pytest.approx(5.678793, rel=1e-6) == t
    assert test["p_value"] == pytest.approx(0.5 - t / (2 * math.sqrt(t * t + 2)), rel=1e-9)
    assert test["p_value"] == pytest.approx(0.0148187, abs=1e-7)
    # 1 df is the Cauchy distribution: P(T >= t) = 1/2 - atan(t) / pi
    for t in (-3.0, -0.4, 0.0, 0.7, 12.0):
        assert summarize.student_t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, rel=1e-10, abs=1e-15)
    assert summarize.one_sided_t_test([1.2], 1.3, 0.0) is None
    assert summarize.one_sided_t_test([1.2, 1.2, 1.2], 1.3, 0.0) is None


def test_student_t_tail_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 7, 10, 30, 200):
        for t in (-40.0, -4.0, -1.5, -0.2, 0.0, 0.3, 1.0, 2.5, 6.0, 25.0, 300.0):
            assert summarize.student_t_sf(t, df) == pytest.approx(scipy_stats.t.sf(t, df), rel=1e-9, abs=1e-300)


def test_over_cap_mismatch_and_over_time_runs_are_flagged_and_left_out(seed_logs, tmp_path):
    logs = copy_logs(seed_logs, tmp_path / "logs")
    edit(logs / "tiny_s1.txt", r"^Total submission size (\S+): \d+ bytes", r"Total submission size \1: 16000001 bytes")
    edit(logs / "tiny_s2.txt", r"^ttt_targets_scored:(\d+) expected:(\d+) ok$",
         r"ttt_targets_scored:10 expected:\2 MISMATCH")
    out = cli(logs, "--reference", 100)
    assert out.returncode == 0, out.stderr
    assert "FLAGGED: over the 16,000,000-byte cap (16,000,001 bytes)" in row_of(out.stdout, "tiny_s1")
    assert "FLAGGED: target-count mismatch: ttt_targets_scored:10" in row_of(out.stdout, "tiny_s2")
    assert row_of(out.stdout, "tiny_s3").endswith("ok")
    only = exact(logs / "tiny_s3.txt", "final_ttt")
    assert "seeds averaged: 1 of 3 (tiny_s3)" in out.stdout
    assert f"val_bpb: mean {only[1]:.8f}  std -" in out.stdout
    assert "warning: tiny_s1 left out of the means: over the 16,000,000-byte cap" in out.stdout
    assert "warning: 1 seed(s) averaged; a record needs at least 3" in out.stdout

    # GPTQ calibration counts as training time: 500 s of steps + 100.5 s of calibration is over
    edit(logs / "tiny_s3.txt", r"^(step:6/6 train_loss.*)train_time:\d+ms", r"\1train_time:500000ms")
    edit(logs / "tiny_s3.txt", r"^(gptq_calibration: .* in )\S+s", r"\g<1>100.50s")
    edit(logs / "tiny_s3.txt", r"^eval_total_time:\d+ms", "eval_total_time:600500ms")
    row = row_of(cli(logs).stdout, "tiny_s3")
    assert "FLAGGED: training 600.5s > 600s; evaluation 600.5s > 600s" in row


@pytest.mark.parametrize("over", [False, True])
def test_each_limit_holds_at_its_edge_and_flags_one_unit_past_it(seed_logs, tmp_path, over):
    """Exactly at a limit is within the rules (16,000,000 bytes, 600 s of training with calibration, 600 s of
    evaluation); one byte, 10 ms or 1 ms more is flagged, each limit on its own."""
    logs = copy_logs(seed_logs, tmp_path / "logs")
    edit(logs / "tiny_s1.txt", r"^Total submission size (\S+): \d+ bytes", rf"Total submission size \1: {16_000_000 + over} bytes")
    edit(logs / "tiny_s2.txt", r"^(step:6/6 train_loss.*)train_time:\d+ms", rf"\g<1>train_time:{500_000 + 10 * over}ms")
    edit(logs / "tiny_s2.txt", r"^(gptq_calibration: .* in )\S+s", r"\g<1>100.00s")
    edit(logs / "tiny_s3.txt", r"^eval_total_time:\d+ms", f"eval_total_time:{600_000 + over}ms")
    flags = {seed: summarize.flags_of(summarize.read_run(logs / f"tiny_s{seed}.txt")) for seed in SEEDS}
    if not over:
        assert flags == {1: [], 2: [], 3: []}
        return
    assert flags[1] == ["over the 16,000,000-byte cap (16,000,001 bytes)"]
    assert flags[2] == ["training 600.0s > 600s"] and flags[3] == ["evaluation 600.0s > 600s"]


def test_a_real_over_cap_run_is_shown_flagged_beside_its_seeds(seed_logs, capped_log, tmp_path):
    logs = copy_logs(seed_logs, tmp_path / "logs")
    shutil.copy(capped_log, logs)
    out = cli(logs)
    assert out.returncode == 0, out.stderr
    assert "== configuration 1 of 1" in out.stdout  # SIZE_CAP_BYTES is a check, not a configuration
    total = int(logged(capped_log, r"^Total submission size \S+: (\d+) bytes"))
    row = table(out.stdout)["tiny_s4"]
    assert row["total"] == str(total) and row["ttt_bpb"] == row["prequant_bpb"] == "-"
    # the run's own `error: SIZE_CAP_BYTES=…` line is flagged too, between the two
    assert row["flags"].startswith(f"FLAGGED: over the 50,000-byte cap ({total:,} bytes); error: SIZE_CAP_BYTES")
    assert row["flags"].endswith("; no final_ttt_exact line")
    bpbs = [exact(seed_logs / f"tiny_s{s}.txt", "final_ttt")[1] for s in SEEDS]
    assert "seeds averaged: 3 of 4 (tiny_s1, tiny_s2, tiny_s3)" in out.stdout
    assert f"val_bpb: mean {statistics.fmean(bpbs):.8f}  std {statistics.stdev(bpbs):.8f}" in out.stdout
    assert "warning: tiny_s4 left out of the means: over the 50,000-byte cap" in out.stdout


def test_a_future_mismatch_error_line_and_a_missing_final_line_are_flagged(seed_logs, tmp_path):
    logs = copy_logs(seed_logs, tmp_path / "logs")
    # a fatal mismatch ends the run after the round trip: its score must not stand in for the missing TTT score
    edit(logs / "tiny_s1.txt", r"^ttt_targets_scored:.*$",
         "error: ttt scored 10 of 2242 targets: MISMATCH, the score is not valid")
    edit(logs / "tiny_s1.txt", r"^final_ttt.*\n", "")
    run = summarize.read_run(logs / "tiny_s1.txt")
    assert run.final is None and run.score("roundtrip") == exact(logs / "tiny_s1.txt", "final_int6_lzma_roundtrip")
    assert "no final_ttt_exact line" in run.flags
    assert any(f.startswith("target-count mismatch: error: ttt scored 10") for f in run.flags)
    assert "seeds averaged: 2 of 3 (tiny_s2, tiny_s3)" in cli(logs).stdout


def test_new_fields_and_unknown_lines_change_nothing(seed_logs, tmp_path):
    logs = copy_logs(seed_logs, tmp_path / "logs")
    edit(logs / "tiny_s1.txt", r"^(step:\d+/\d+ .*step_avg:\S+ms)$", r"\1 bytes_per_s:123456 mfu:12.5%")
    edit(logs / "tiny_s1.txt", r"^(hardware: .*)$", "\\1\nflops_per_byte train:123 eval:45\nrate_control: q 0.9 ok")
    before, after = table(cli(seed_logs).stdout), table(cli(logs).stdout)
    assert after == before
    # a reused RUN_ID appends a second run to the file: the last one is read, and the summary says so
    first = (seed_logs / "tiny_s2.txt").read_text().replace(" ok\n", " MISMATCH\n")  # a flaw of the earlier run
    (logs / "tiny_s1.txt").write_text(first + (seed_logs / "tiny_s1.txt").read_text())
    out = cli(logs)
    assert table(out.stdout)["tiny_s1"] == before["tiny_s1"]
    assert "holds 2 runs (a reused RUN_ID); only the last is read" in out.stdout


def test_a_left_out_seed_is_warned_about(seed_logs, tmp_path):
    logs = copy_logs(seed_logs, tmp_path / "logs")
    out = cli(logs / "tiny_s1.txt", logs / "tiny_s3.txt")
    assert "warning: run ids tiny_s* skip tiny_s2: seeds left out?" in out.stdout
    assert f"warning: {(logs / 'tiny_s2.txt').resolve()} has this configuration (seed 2) but was not given" \
        in out.stdout
    assert "warning: 2 seed(s) averaged; a record needs at least 3" in out.stdout
    (logs / "tiny_s2.txt").unlink()  # the gap in run ids alone still tells
    out = cli(logs)
    assert "skip tiny_s2" in out.stdout and "was not given" not in out.stdout
    assert "warning" not in cli(seed_logs).stdout


def test_knobs_split_groups_but_seeds_names_and_paths_do_not(seed_logs, tmp_path):
    logs = copy_logs(seed_logs, tmp_path / "logs")
    edit(logs / "tiny_s2.txt", r"^hparam data_path=.*$", "hparam data_path=/elsewhere")
    edit(logs / "tiny_s2.txt", r"^hparam run_id=.*$", "hparam run_id=renamed")
    assert cli(logs).stdout.count("== configuration 1 of 1") == 1
    edit(logs / "tiny_s3.txt", r"^hparam matrix_lr=.*$", "hparam matrix_lr=0.05")
    out = cli(logs)
    assert "== configuration 1 of 2: matrix_lr=0.025" in out.stdout
    assert "== configuration 2 of 2: matrix_lr=0.05" in out.stdout
    assert "seeds averaged: 2 of 2 (tiny_s1, renamed)" in out.stdout
    bad = cli(logs, "--write-submission", tmp_path / "sub")
    assert bad.returncode == 2 and "2 configurations (differing in matrix_lr)" in bad.stderr


def test_submission_json_holds_only_what_the_logs_say(seed_logs, tmp_path):
    logs = copy_logs(seed_logs, tmp_path / "logs")
    edit(logs / "tiny_s3.txt", r"^hardware: .*\n", "")  # an unknown value must come out null
    sub = tmp_path / "record"
    reference = 8.0
    out = cli(logs, "--reference", reference, "--write-submission", sub, "--author", "A. Person")
    assert out.returncode == 0, out.stderr
    info = json.loads((sub / "submission.json").read_text())
    assert set(info) == {"author", "github_id", "name", "blurb", "date", "track", "val_bpb", "val_loss",
                         "val_bpb_std", "val_loss_std", "pre_quant_val_bpb", "roundtrip_val_bpb", "seeds",
                         "seed_results", "bytes_total", "bytes_code", "hardware", "pytorch_version",
                         "python_version", "cuda_version", "compliance", "significance", "warnings"}
    assert info["author"] == "A. Person"
    assert info["github_id"] is info["name"] is info["blurb"] is info["date"] is None
    assert info["hardware"] is None and info["track"] is None  # one log does not name its hardware
    assert info["seeds"] == [1, 2, 3] and list(info["seed_results"]) == ["1", "2", "3"]
    finals = [exact(logs / f"tiny_s{s}.txt", "final_ttt") for s in SEEDS]
    assert info["val_bpb"] == pytest.approx(statistics.fmean(b for _, b in finals), abs=1e-12)
    assert info["val_loss"] == pytest.approx(statistics.fmean(l for l, _ in finals), abs=1e-12)
    assert info["val_bpb_std"] == pytest.approx(statistics.stdev(b for _, b in finals), abs=1e-12)
    assert info["pre_quant_val_bpb"] == pytest.approx(
        statistics.fmean(exact(logs / f"tiny_s{s}.txt", "final_prequant")[1] for s in SEEDS), abs=1e-12)
    python, torch_version, cuda = logged(logs / "tiny_s1.txt", r"^python (\S+) torch (\S+) cuda (\S+)")
    expected_cuda = None if cuda == "None" else cuda  # a CPU build logs None; a CUDA build its version, GPU or not
    assert (info["python_version"], info["pytorch_version"], info["cuda_version"]) == (python, torch_version,
                                                                                      expected_cuda)
    for seed in SEEDS:
        path, result = logs / f"tiny_s{seed}.txt", info["seed_results"][str(seed)]
        assert (result["val_loss"], result["val_bpb"]) == exact(path, "final_ttt")
        assert (result["roundtrip_val_loss"], result["roundtrip_val_bpb"]) == exact(path, "final_int6_lzma_roundtrip")
        assert result["sliding_val_bpb"] is None  # SLIDING_EVAL is off in these runs
        assert result["artifact_bytes"] == int(logged(path, r"^Total submission size \S+: (\d+) bytes"))
        assert result["bytes_model"] == int(logged(path, r"^Serialized model \S+: (\d+) bytes"))
        steps, train_ms, avg = logged(path, r"^step:(\d+)/\d+ .*train_time:(\d+)ms step_avg:([0-9.]+)ms")
        calib = float(logged(path, r"^gptq_calibration: .* in (\S+)s"))
        assert (result["steps"], result["step_avg_ms"]) == (int(steps), float(avg))
        assert result["train_time_seconds"] == pytest.approx(int(train_ms) / 1000 + calib, abs=1e-9)
        assert result["eval_time_seconds"] == int(logged(path, r"^eval_total_time:(\d+)ms")) / 1000
        assert result["flags"] == [] and result["log"] == path.name
        assert (sub / path.name).read_text() == path.read_text()
    assert info["seed_results"]["3"]["hardware"] is None and "CPU" in info["seed_results"]["1"]["hardware"]
    assert info["bytes_total"] == max(r["artifact_bytes"] for r in info["seed_results"].values())
    assert info["compliance"] == dict(artifact_under_16mb=True, train_under_600s=True, eval_under_600s=True,
                                      score_first_ttt=True, all_targets_scored=True, three_seeds=True)
    significance = info["significance"]
    assert significance["reference"] == reference and significance["df"] == 2
    assert significance["p_value"] == summarize.one_sided_t_test([b for _, b in finals], reference,
                                                                 0.005 / math.log(2))["p_value"]
    readme = (sub / "README.md").read_text()
    assert "16,000,000" in readme and "hardware differs between runs of this configuration" in readme
    for seed, (loss, bpb) in zip(SEEDS, finals):
        assert f"| {seed} | tiny_s{seed} | {bpb:.8f} | {loss:.8f} |" in readme


def test_flags_reach_the_submission_compliance(seed_logs, tmp_path):
    logs = copy_logs(seed_logs, tmp_path / "logs")
    edit(logs / "tiny_s2.txt", r"^Total submission size (\S+): \d+ bytes", r"Total submission size \1: 16000001 bytes")
    assert cli(logs, "--write-submission", tmp_path / "sub").returncode == 0
    info = json.loads((tmp_path / "sub" / "submission.json").read_text())
    assert info["compliance"]["artifact_under_16mb"] is False and info["compliance"]["three_seeds"] is False
    assert info["seeds"] == [1, 3] and info["seed_results"]["2"]["flags"]
    assert info["significance"] is None and info["bytes_total"] == 16000001


def test_diverged_and_stopped_runs_are_flagged_left_out_and_written_as_strict_json(seed_logs, diverged_run, tmp_path):
    """A real diverged log (its own configuration: the learning rates differ), a log of the kind the issue found (nan
    losses, then NaN scores), and a run stopped by SIGTERM: each is flagged and no mean includes it; submission.json
    writes the NaN scores as null with the reason beside them, and strict parsers read it."""
    logs = copy_logs(seed_logs, tmp_path / "logs")
    edit(logs / "tiny_s2.txt", r"^(step:[4-6]/6 train_loss:)\S+", r"\1nan")
    edit(logs / "tiny_s2.txt", r"^(final_\w+_exact) val_loss:\S+ val_bpb:\S+$", r"\1 val_loss:nan val_bpb:nan")
    text = (seed_logs / "tiny_s3.txt").read_text()
    stop = "error: stopped by SIGTERM during evaluation (final_prequant); the artifact final_model.int6.ptz is complete"
    (logs / "tiny_s3.txt").write_text(text[:text.index("\nfinal_prequant val_loss")] + f"\n{stop}\n")
    shutil.copy(diverged_run[0].cwd / "logs" / "diverged.txt", logs)
    out = cli(logs)
    assert out.returncode == 0, out.stderr
    row = row_of(out.stdout, "tiny_s2")
    assert "FLAGGED: non-finite train_loss from step 4; non-finite final_prequant score" in row
    assert "FLAGGED: error: stopped by SIGTERM during evaluation" in row_of(out.stdout, "tiny_s3")
    assert re.search(r"FLAGGED: error: training diverged: train_loss nan at step \d+/12; .*; non-finite train_loss "
                     r"from step \d+; no final_ttt_exact line", row_of(out.stdout, "diverged"))
    only = exact(logs / "tiny_s1.txt", "final_ttt")
    assert "seeds averaged: 1 of 3 (tiny_s1)" in out.stdout and "seeds averaged: 0 of 1 (-)" in out.stdout
    assert f"val_bpb: mean {only[1]:.8f}  std -" in out.stdout and f"val_loss: mean {only[0]:.8f}  std -" in out.stdout
    (logs / "diverged.txt").unlink()  # --write-submission takes one configuration
    assert cli(logs, "--write-submission", tmp_path / "sub").returncode == 0
    info = json.loads((tmp_path / "sub" / "submission.json").read_text(), parse_constant=lambda c: 1 / 0)
    diverged = info["seed_results"]["2"]
    assert diverged["val_bpb"] is None and diverged["val_bpb_null_reason"] == "the log holds nan: the run diverged"
    assert diverged["pre_quant_val_bpb"] is None and diverged["flags"][0] == "non-finite train_loss from step 4"
    assert info["val_bpb"] == only[1] and info["seeds"] == [1]


@pytest.mark.parametrize("case", ["missing", "empty folder", "truncated", "source only", "binary"])
def test_bad_input_is_one_line_and_exit_2(seed_logs, tmp_path, case):
    target = tmp_path / "x.txt"
    if case == "empty folder":
        target = tmp_path / "empty"
        target.mkdir()
    elif case == "truncated":  # a run killed during evaluation: no final score and no reason given
        text = (seed_logs / "tiny_s1.txt").read_text()
        target.write_text(text[:text.index("\nfinal_prequant val_loss")])
    elif case == "source only":  # killed while logging its own source, which holds the word MISMATCH
        text = (seed_logs / "tiny_s1.txt").read_text()
        target.write_text(text[:text.index(summarize.SEPARATOR)])
    elif case == "binary":
        target.write_bytes(bytes(range(256)))
    out = cli(target)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"error: {target}: ") and "Traceback" not in out.stderr
    assert ("expected" in out.stderr) or ("cannot read" in out.stderr)


def test_plot_is_a_png(seed_logs, tmp_path):
    pytest.importorskip("matplotlib")
    out = cli(seed_logs, "--plot", tmp_path / "runs.png")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_one_clear_line(seed_logs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert summarize.main([str(seed_logs), "--plot", str(tmp_path / "runs.png")]) == 2
    assert capsys.readouterr().err == "error: --plot needs matplotlib, which is not installed: pip install matplotlib\n"
    assert not (tmp_path / "runs.png").exists()


def logged_buckets(path: Path, label: str) -> dict[str, tuple[float, int, int]]:
    """The test's own reading of a log's breakdown lines: bucket -> (nats, targets, bytes)."""
    lines = re.findall(rf"^{label}_breakdown (\S+) nats:(\S+) targets:(\d+) bytes:(\d+) ", path.read_text(), re.M)
    return {name: (float(nats), int(n), int(b)) for name, nats, n, b in lines}


def breakdown_table(stdout: str, grouping: str) -> dict[str, list[str]]:
    """The printed table of one grouping: bucket -> its cells split on whitespace."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(grouping + " "))
    rows = {}
    for line in lines[start + 1:]:
        if not line or line.split()[0] in summarize.GROUPINGS:
            break
        rows[line.split()[0]] = line.split()[1:]
    return rows


def test_breakdown_tables_carry_the_logged_buckets(seed_logs):
    """--breakdown prints, per bucket and evaluation, the bpb and share the log's sums give; every bucket of every
    grouping is there, and the shares of a grouping add up to 100%."""
    path = seed_logs / "tiny_s1.txt"
    out = cli(path, "--breakdown")
    assert out.returncode == 0, out.stderr
    for grouping in summarize.GROUPINGS:
        table = breakdown_table(out.stdout, grouping)
        for column, label in enumerate(("final_prequant", "final_int6_lzma_roundtrip", "final_ttt")):
            logged = {k.split(":", 1)[1]: v for k, v in logged_buckets(path, label).items()
                      if k.startswith(grouping + ":")}
            assert list(table) == list(logged), (grouping, label)
            total = sum(nats for nats, _, _ in logged.values())
            for bucket, (nats, _, nbytes) in logged.items():
                bpb, share = table[bucket][2 * column:2 * column + 2]
                assert bpb == (f"{nats / math.log(2) / nbytes:.4f}" if nbytes else "-"), (grouping, bucket)
                assert share == f"{nats / total:.1%}", (grouping, bucket)
            shares = [float(row[2 * column + 1][:-1]) for row in table.values()]  # each rounded to 0.1%
            assert sum(shares) == pytest.approx(100, abs=0.05 * len(shares))
    assert "ttt gain" not in out.stdout  # no sliding evaluation to compare TTT with


def class_table_with_sliding(seed_logs, tmp_path, sliding_nats) -> tuple[dict, dict]:
    """Seed 1's TTT buckets, and the --breakdown class table once the log is given a sliding evaluation whose buckets
    cost sliding_nats(bucket, TTT's nats)."""
    path = copy_logs(seed_logs, tmp_path, seeds=(1,)) / "tiny_s1.txt"
    ttt = logged_buckets(path, "final_ttt")
    sliding = [f"final_sliding_breakdown {k} nats:{sliding_nats(k, n)!r} targets:{t} bytes:{b} bpb:- share:-"
               for k, (n, t, b) in ttt.items()]
    edit(path, r"^(final_ttt_breakdown slot:0 .*)$", "\n".join(sliding) + r"\n\1")
    out = cli(path, "--breakdown")
    assert out.returncode == 0, out.stderr
    return ttt, breakdown_table(out.stdout, "class")


def test_ttt_gain_is_measured_against_the_sliding_evaluation(seed_logs, tmp_path):
    """A log given a sliding evaluation whose every bucket cost 10% more nats than TTT's: TTT gains a tenth of each
    bucket's bpb, and each bucket's share of the saved nats is its share of TTT's bits."""
    ttt, table = class_table_with_sliding(seed_logs, tmp_path, lambda k, n: 1.1 * n)
    total = sum(n for k, (n, _, _) in ttt.items() if k.startswith("class:"))
    for bucket, row in table.items():
        nats, _, nbytes = ttt[f"class:{bucket}"]
        gain = f"{0.1 * nats / math.log(2) / nbytes:+.4f}" if nbytes else "-"
        assert row[-2:] == [gain, f"{nats / total:.1%}"], (bucket, row)


def test_breakdown_sums_read_from_a_log_equal_its_headline_sums(seed_logs):
    run = summarize.read_run(seed_logs / "tiny_s2.txt")
    assert sorted(run.breakdown) == ["final_prequant", "final_ttt", "roundtrip"]
    nll, targets, nbytes = logged(seed_logs / "tiny_s2.txt", r"^final_ttt_sums nll_nats:(\S+) targets:(\d+) "
                                                             r"bytes:(\d+)")
    for grouping in summarize.GROUPINGS:
        rows = [v for k, v in run.breakdown["final_ttt"].items() if k.startswith(grouping + ":")]
        assert sum(n for n, _, _ in rows) == pytest.approx(float(nll), rel=1e-9), grouping
        assert (sum(t for _, t, _ in rows), sum(b for _, _, b in rows)) == (int(targets), int(nbytes)), grouping


def test_plot_breakdown_is_a_png(seed_logs, tmp_path):
    pytest.importorskip("matplotlib")
    for args in ([seed_logs / "tiny_s1.txt"], [seed_logs, "--evals", "roundtrip,ttt"]):
        out = cli(*args, "--plot-breakdown", tmp_path / "breakdown.png")
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "breakdown.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_breakdown_without_matplotlib_or_breakdown_lines_is_one_clear_line(seed_logs, tmp_path, monkeypatch,
                                                                               capsys):
    old = copy_logs(seed_logs, tmp_path, seeds=(1,)) / "tiny_s1.txt"
    edit(old, r"^final_\w+_breakdown .*\n", "")  # a log written before the breakdown existed
    assert summarize.main([str(old), "--breakdown"]) == 0
    assert f"== breakdown of tiny_s1: no *_breakdown lines in {old}" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for path, message in ((seed_logs, "--plot-breakdown needs matplotlib, which is not installed"),
                          (old, "--plot-breakdown: no *_breakdown lines")):
        assert summarize.main([str(path), "--plot-breakdown", str(tmp_path / "b.png")]) == 2
        assert capsys.readouterr().err.startswith(f"error: {message}")


def test_ttt_gain_where_ttt_helped_one_class_and_hurt_another(seed_logs, tmp_path):
    """A sliding evaluation that cost 1.5 nats more than TTT on lowercase bytes, 0.5 fewer on whitespace and the same
    elsewhere: TTT saved 1.0 nat over the class buckets, 150% of it on lowercase and -50% on whitespace (not the
    buckets' shares of TTT's bits), and its gain in bpb is the difference's bits over each bucket's bytes."""
    delta = {"class:lower": 1.5, "class:space": -0.5}
    ttt, table = class_table_with_sliding(seed_logs, tmp_path, lambda k, n: n + delta.get(k, 0.0))
    assert {"lower", "space", "upper", "punct"} <= set(table)
    for bucket, row in table.items():
        nats, _, nbytes = ttt[f"class:{bucket}"]
        d = delta.get(f"class:{bucket}", 0.0)
        gain = f"{d / math.log(2) / nbytes:+.4f}" if nbytes else "-"
        assert row[-2:] == [gain, {"lower": "150.0%", "space": "-50.0%"}.get(bucket, "0.0%")], (bucket, row)


def test_strict_json_replaces_every_non_finite_number_with_null_and_a_reason():
    value = {"a": math.inf, "b": math.nan, "c": [math.nan, 1.5, -math.inf], "d": {"e": -math.inf, "f": 0.0},
             "g": "nan", "h": 2}
    assert summarize.strict_json(value) == {
        "a": None, "a_null_reason": "the log holds inf: the run diverged",
        "b": None, "b_null_reason": "the log holds nan: the run diverged",
        "c": [None, 1.5, None],
        "d": {"e": None, "e_null_reason": "the log holds -inf: the run diverged", "f": 0.0},
        "g": "nan", "h": 2}


@pytest.mark.parametrize("loss, bpb, flagged", [("inf", "1.25000000", True), ("0.87000000", "nan", True),
                                                ("nan", "nan", True), ("0.87000000", "1.25000000", False)])
def test_a_score_is_flagged_when_its_loss_or_its_bpb_is_not_finite(loss, bpb, flagged):
    run = summarize.Run(Path("r.txt"), exact={"final_ttt": ("0.86000000", "1.24000000"),
                                              "final_prequant": (loss, bpb)}, bytes_total=1000)
    assert summarize.flags_of(run) == (["non-finite final_prequant score"] if flagged else [])
