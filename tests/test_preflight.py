"""PREFLIGHT=1: the go/no-go check before a paid run (Main): a few timed steps of the real configuration, GPTQ
calibration, the rate-controlled export and a few TTT chunks, projected to the full run, then one verdict line."""
import re

import pytest

import train_gpt
from conftest import SCRIPT, run_main, run_script, tiny_env

EARLIER_ARTIFACT = b"an earlier run's complete artifact"


@pytest.fixture(scope="module")
def go_run(tmp_path_factory, corpus):
    """A capped run's preflight, in a folder holding an earlier artifact: 30 steps of a run that would take 10,000."""
    cwd = tmp_path_factory.mktemp("preflight")
    (cwd / train_gpt.ARTIFACT_NAME).write_bytes(EARLIER_ARTIFACT)
    env = tiny_env(corpus, PREFLIGHT=1, ITERATIONS=10_000, MAX_WALLCLOCK_SECONDS=20, TRAIN_LOG_EVERY=10)
    return run_script(cwd, env, run_id="preflight")


def number(line: str, pattern: str) -> float:
    return float(re.search(pattern, line).group(1))


def test_preflight_gives_go_and_projects_the_capped_run_from_its_timed_steps(go_run):
    run = go_run
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    assert run.proc.stdout.splitlines()[-1] == "preflight: GO" == run.log.splitlines()[-1]
    assert run.lines("step:30/30 ") and not run.lines("step:31/")  # min(ITERATIONS, 30) steps
    (line,) = run.lines("preflight_training: ")
    step_s, calib_s = number(line, r"([0-9.]+)ms/step") / 1000, number(line, r"gptq_calibration:([0-9.]+)s")
    steps = number(line, r"projected (\d+) steps")
    # the cap less the automatic GPTQ reserve (1.5 x the calibration + 1 s), in steps of the timed length
    expected = (20 - (1.5 * calib_s + 1.0)) / step_s
    assert steps == pytest.approx(expected, rel=0.02, abs=2), line
    assert number(line, r"steps, (\d+) training bytes") == steps * 1008
    (artifact,) = run.lines("preflight_artifact: ")
    first = run.lines("rate_control: step 0:")[0]
    assert number(artifact, r"(\d+) bytes") == number(first, r"artifact (\d+) bytes") > 0  # fits as quantised
    (evaluation,) = run.lines("preflight_evaluation: ")
    assert re.search(r"projected [0-9.]+s from 767 of 2242 targets", evaluation), evaluation  # 3 TTT chunks of 256
    assert run.lines("ttt_targets_scored:767 expected:767 ok")
    # nothing a real run leaves is written: the earlier artifact stays, and there is no submission
    assert (run.cwd / train_gpt.ARTIFACT_NAME).read_bytes() == EARLIER_ARTIFACT
    assert not list((run.cwd / "logs").glob("*.submission.json"))


CODE_BYTES = len(SCRIPT.read_bytes())
NO_GO = {  # case -> (environment, exit code, what the verdict names)
    "missing data": (dict(DATA_PATH="{tmp}/none"), 2, "DATA_PATH={tmp}/none: no fineweb_train_*.bin shards"),
    "evaluation over its budget": (dict(EVAL_MAX_SECONDS="0.001"), 3, "over EVAL_MAX_SECONDS=0.001"),
    "artifact that cannot fit at int4": (dict(SIZE_CAP_BYTES=str(CODE_BYTES + 5000)), 3,
                                         f"SIZE_CAP_BYTES={CODE_BYTES + 5000}: code + artifact take"),
    "full disk": (dict(), 3, "bytes free on disk here, fewer than twice SIZE_CAP_BYTES"),
}


@pytest.mark.parametrize("case", NO_GO)
def test_preflight_says_no_go_with_the_reason_and_a_nonzero_exit(case, tmp_path, corpus, monkeypatch, capsys):
    overrides, code, reason = NO_GO[case]
    env = tiny_env(corpus, PREFLIGHT=1, ITERATIONS=3, **{k: v.format(tmp=tmp_path) for k, v in overrides.items()})
    if case == "full disk":
        usage = train_gpt.shutil.disk_usage(tmp_path)._replace(free=2 * int(env.get("SIZE_CAP_BYTES", 16e6)) - 1)
        monkeypatch.setattr(train_gpt.shutil, "disk_usage", lambda path: usage)  # one byte short
    r = run_main(tmp_path / "run", env, monkeypatch, capsys)
    assert r.code == code, (r.stdout[-2000:], r.stderr)
    last = (r.stderr if code == 2 else r.stdout).splitlines()[-1]  # a configuration error stops before the logger
    assert last.startswith("preflight: NO-GO ") and reason.format(tmp=tmp_path) in last, last
    assert "preflight: GO" not in r.stdout
    if case == "artifact that cannot fit at int4":  # the export tried every width first
        assert "rate_control: every matrix is at int4" in r.stdout
