"""PREFLIGHT=1 (Main): the run itself, shortened to 30 steps and evaluations of three TTT chunks, timed and projected
to the real run, then one verdict line: GO, or NO-GO with the reasons and a non-zero exit."""
import re
import sys

import pytest

import train_gpt
from conftest import ROOT, SCRIPT, run_main, run_script, tiny_env

sys.path.insert(0, str(ROOT / "tools"))
import summarize  # noqa: E402

EARLIER_ARTIFACT = b"an earlier run's complete artifact"


@pytest.fixture(scope="module")
def go_run(tmp_path_factory, corpus):
    """A capped run's preflight, in a folder holding an earlier artifact: 30 steps of a run that would take 10,000."""
    cwd = tmp_path_factory.mktemp("preflight")
    (cwd / train_gpt.ARTIFACT_NAME).write_bytes(EARLIER_ARTIFACT)
    env = tiny_env(corpus, PREFLIGHT=1, ITERATIONS=10_000, MAX_WALLCLOCK_SECONDS=20, WARMUP_STEPS=2,
                   TRAIN_LOG_EVERY=10)
    return run_script(cwd, env, run_id="preflight")


def number(line: str, pattern: str) -> float:
    return float(re.search(pattern, line).group(1))


def test_preflight_gives_go_and_projects_the_capped_run_from_its_timed_steps(go_run):
    run = go_run
    assert run.proc.returncode == 0, run.proc.stderr[-3000:]
    assert run.proc.stdout.splitlines()[-1] == "preflight: GO" == run.log.splitlines()[-1]
    assert run.lines("warmup_priming: 2 steps done (first, compiling: ")
    assert run.lines("step:30/30 ") and not run.lines("step:31/")  # min(ITERATIONS, 30) steps
    (projection,) = run.lines("preflight_projection: ")
    steps, step_ms = number(projection, r"^preflight_projection: (\d+) steps"), number(projection, r"of ([0-9.]+)ms")
    assert step_ms == pytest.approx(run.value("step:30/30", "train_time") / 30, rel=0.05)  # the clock runs on a bit
    reserve = number(run.lines("gptq_reserve: auto ")[0], r"auto ([0-9.]+)s")  # as the real run measures it
    assert abs(steps - (20 - reserve) / (step_ms / 1000)) < 1.01  # the cap less the reserve, in timed steps
    assert number(projection, r"steps of [0-9.]+ms, (\d+) training bytes") == steps * 1008
    # every evaluation ran on three TTT chunks of 256 bytes (767 targets) and is scaled to the split's 2,242
    for label in ("final_prequant", "final_int6_lzma_roundtrip", "final_ttt"):
        assert run.lines(f"{label}_sums ")[0].split()[2] == "targets:767", label
    total_s = run.value("eval_total_time", "eval_total_time") / 1000  # from reading the artifact on, as measured
    assert number(projection, r"evaluation ([0-9.]+)s") == pytest.approx(total_s * 2242 / 768, rel=0.1, abs=0.15)
    assert run.lines("Total submission size int6+lzma: ")  # the export went through rate control
    # its artifact has its own name: the earlier one stays, and there is no submission; summarize flags the log
    assert (run.cwd / train_gpt.ARTIFACT_NAME).read_bytes() == EARLIER_ARTIFACT
    assert (run.cwd / "preflight_model.int6.ptz").is_file()
    assert not list((run.cwd / "logs").glob("*.submission.json"))
    assert summarize.flags_of(summarize.read_run(run.cwd / "logs" / "preflight.txt")) == [
        "a preflight (PREFLIGHT=1): 30 steps, scored on three TTT chunks"]


CODE_BYTES = len(SCRIPT.read_bytes())
NO_GO = {  # case -> (environment, exit code, what the verdict names)
    "missing data": (dict(DATA_PATH="{tmp}/none"), 2, "DATA_PATH={tmp}/none: no fineweb_train_*.bin shards"),
    "evaluation over its budget": (dict(EVAL_MAX_SECONDS="0.001"), 3, "over EVAL_MAX_SECONDS=0.001"),
    "artifact that cannot fit at int4": (dict(SIZE_CAP_BYTES=str(CODE_BYTES + 5000)), 3,
                                         f"SIZE_CAP_BYTES={CODE_BYTES + 5000}: code + artifact take"),
    "disk one byte short": (dict(), 3, "bytes free on disk here, fewer than twice SIZE_CAP_BYTES"),
}


@pytest.mark.parametrize("case", NO_GO)
def test_preflight_says_no_go_with_the_reason_and_a_nonzero_exit(case, tmp_path, corpus, monkeypatch, capsys):
    overrides, code, reason = NO_GO[case]
    env = tiny_env(corpus, PREFLIGHT=1, ITERATIONS=3, **{k: v.format(tmp=tmp_path) for k, v in overrides.items()})
    if case == "disk one byte short":
        usage = train_gpt.shutil.disk_usage(tmp_path)._replace(free=2 * train_gpt.SIZE_CAP_BYTES - 1)
        monkeypatch.setattr(train_gpt.shutil, "disk_usage", lambda path: usage)
    r = run_main(tmp_path / "run", env, monkeypatch, capsys)
    assert r.code == code, (r.stdout[-2000:], r.stderr)
    last = (r.stdout if case in ("evaluation over its budget", "disk one byte short") else r.stderr).splitlines()[-1]
    assert last.startswith("preflight: NO-GO ") and reason.format(tmp=tmp_path) in last, last
    assert "preflight: GO" not in r.stdout
    if case == "artifact that cannot fit at int4":  # the export tried every width first
        assert "rate_control: every matrix is at int4" in r.stdout
