"""From run logs to a record submission: a table of runs, a seed summary with a one-sided t-test against a
reference score, the challenge's submission.json with a README skeleton, and plots; and where the bits go.

    python3 tools/summarize.py logs/rec_seed*.txt --reference 1.2622 --write-submission records/rec --plot rec.png
    python3 tools/summarize.py logs/run.txt --breakdown --plot-breakdown breakdown.png   # bpb by slot, class, ...

Every figure comes from a log line written by train_gpt.py (the `final_*_exact` lines for scores, never the rounded
ones); a value no log holds is printed as `-` and written as null. Unknown lines are ignored.

Rules this tool applies (documented here because reviewers depend on them):
- Configuration: runs whose `hparam` lines differ in any knob except those in NOT_CONFIGURATION are grouped apart.
- Flags: a run over the decimal 16,000,000-byte cap (or its own logged cap), over 600 s of training (step time plus
  GPTQ calibration) or 600 s of evaluation, with a target-count mismatch, an `error:` line (a run that diverged, was
  stopped by a signal, or failed otherwise ends on one), a non-finite train loss or score, or without the final line
  its knobs promise (final_ttt when TTT_ENABLED) is flagged and left out of every mean.
- JSON is strict: a value the logs hold as nan or inf is written as null, with `<key>_null_reason` beside it.
- Missing seeds: a group is warned about when it averages fewer than 3 seeds, when a flagged run was left out,
  when two runs share a seed, when its run ids end in numbers with a gap of at most MAX_SEED_GAP (rec_s1, rec_s3:
  rec_s2 missing), and when a log of the same configuration lies beside the given ones but was not given.
- A file with neither a final score nor a stated reason for stopping (size cap, error, mismatch) is bad input:
  one line naming it, exit 2.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

SIZE_CAP_BYTES = 16_000_000  # decimal: the challenge's cap, not 16 MiB
TRAIN_BUDGET_S = 600.0
EVAL_BUDGET_S = 600.0
RECORD_MARGIN_BPB = 0.005 / math.log(2)  # 0.005 nats per byte = 0.0072135 bpb for a byte-level model
MIN_SEEDS = 3
MAX_SEED_GAP = 10  # numbered run ids further apart than this are taken for timestamps, not seed numbers
LOG_SUFFIXES = (".txt", ".log")
SEPARATOR = "=" * 100  # train_gpt.py logs its own source, then this line, then the run
# Knobs that name, place or narrate a run without changing what is trained or scored.
NOT_CONFIGURATION = {"seed", "run_id", "data_path", "tokenizer_path", "eval_only", "train_log_every",
                     "ttt_log_every", "val_loss_every", "size_cap_bytes"}
FINAL_LABELS = ("final_prequant", "roundtrip", "final_sliding", "final_ttt")
EVALUATIONS = dict(zip(("prequant", "roundtrip", "sliding", "ttt"), FINAL_LABELS))  # short names (--evals)
GROUPINGS = ("slot", "class", "doc_pos", "context")  # the breakdown's, as train_gpt.py logs them


class BadInput(Exception):
    """One line naming the file and what was expected; the tool exits 2."""


@dataclass
class Run:
    path: Path
    hparams: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    hardware: str | None = None
    steps: int | None = None
    step_avg_ms: float | None = None
    train_ms: float | None = None
    calib_s: float | None = None
    wallclock_stop: bool = False
    exact: dict = field(default_factory=dict)  # label -> (loss string, bpb string), as logged
    eval_ms: float | None = None
    bytes_model: int | None = None
    bytes_code: int | None = None
    bytes_total: int | None = None
    logged_cap: int | None = None
    cap_exceeded_line: bool = False
    mismatches: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    train_curve: list = field(default_factory=list)  # (train ms, train loss)
    nonfinite_loss_step: int | None = None  # the first step whose train loss is nan or inf
    val_curve: list = field(default_factory=list)  # (train ms, val bpb)
    ttt_curve: list = field(default_factory=list)  # (chunk, running bpb)
    breakdown: dict = field(default_factory=dict)  # evaluation -> {"grouping:bucket": (nats, targets, bytes)}
    runs_in_file: int = 1
    flags: list = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.hparams.get("run_id") or self.path.stem

    @property
    def seed(self) -> int | None:
        value = self.hparams.get("seed")
        return int(value) if value is not None and value.lstrip("-").isdigit() else None

    def score(self, label: str) -> tuple[float, float] | None:
        """(val_loss, val_bpb) of an exact final line, parsed from the logged 8-decimal strings."""
        pair = self.exact.get(label)
        return (float(pair[0]), float(pair[1])) if pair else None

    @property
    def final_label(self) -> str:
        """The evaluation whose score is the run's result: the last one its knobs enable (as train_gpt.py)."""
        if self.hparams.get("ttt_enabled", "True") == "True":
            return "final_ttt"
        if self.hparams.get("sliding_eval") == "True":
            return "final_sliding"
        return "roundtrip"

    @property
    def final(self) -> tuple[float, float] | None:
        return self.score(self.final_label)

    @property
    def train_seconds(self) -> float | None:
        """Training time as the rules count it: the timed steps plus GPTQ calibration."""
        if self.train_ms is None:
            return None
        return self.train_ms / 1000.0 + (self.calib_s or 0.0)


# -----------------------------------------------------------------------------------------------------------------
# Reading logs
# -----------------------------------------------------------------------------------------------------------------

NUM = r"(-?[0-9.]+(?:e[-+]?\d+)?|nan|inf)"
PATTERNS = {
    "hparam": re.compile(r"^hparam (\w+)=(.*)$"),
    "versions": re.compile(r"^python (\S+) torch (\S+) cuda (\S+)"),
    "hardware": re.compile(r"^hardware: (.+)$"),
    "step": re.compile(r"^step:(\d+)/(\d+) "),
    "stopping_early": re.compile(r"^stopping_early: wallclock_cap"),
    "calibration": re.compile(rf"^gptq_calibration: .* in {NUM}s"),
    "model_bytes": re.compile(r"^Serialized model \S+: (\d+) bytes"),
    "code_bytes": re.compile(r"^Code size: (\d+) bytes"),
    "total_bytes": re.compile(r"^Total submission size \S+: (\d+) bytes(?: \(cap (\d+))?"),
    "cap_exceeded": re.compile(r"^!!! SIZE CAP EXCEEDED"),
    "exact": re.compile(r"^(final_\w+)_exact val_loss:([0-9.]+|nan|inf) val_bpb:([0-9.]+|nan|inf)"),
    "eval_total": re.compile(rf"^eval_total_time:{NUM}ms"),
    "targets": re.compile(r"^(\w+)_targets_scored:(\d+) expected:(\d+) (\w+)"),
    "chunk": re.compile(rf"^ttt_chunk:(\d+)/(\d+) running_bpb:{NUM}"),
    "breakdown": re.compile(rf"^(final_\w+)_breakdown (\w+:\S+) nats:{NUM} targets:(\d+) bytes:(\d+)"),
    "error": re.compile(r"^error: (.*)$"),
}


def final_key(label: str) -> str:
    """The roundtrip label names the quantiser (final_int6_lzma_roundtrip); the others are fixed."""
    return "roundtrip" if label.endswith("_roundtrip") else label


def parse_lines(run: Run, lines: list[str]) -> None:
    for line in lines:
        line = line.rstrip("\n")
        for kind, pattern in PATTERNS.items():
            m = pattern.match(line)
            if m:
                apply_line(run, kind, m)
                break
        if "MISMATCH" in line and not line[:1].isspace() and not PATTERNS["targets"].match(line):
            run.mismatches.append(line)  # however a future line words it, a mismatch is never ignored


def apply_line(run: Run, kind: str, m: re.Match) -> None:
    g = m.groups()
    if kind == "hparam":
        run.hparams[g[0]] = g[1]
    elif kind == "versions":
        run.versions = dict(python=g[0], torch=g[1], cuda=None if g[2] == "None" else g[2])
    elif kind == "hardware":
        run.hardware = g[0].strip()
    elif kind == "step":
        apply_step_line(run, int(g[0]), m.string)
    elif kind == "stopping_early":
        run.wallclock_stop = True
    elif kind == "calibration":
        run.calib_s = float(g[0])
    elif kind == "model_bytes":
        run.bytes_model = int(g[0])
    elif kind == "code_bytes":
        run.bytes_code = int(g[0])
    elif kind == "total_bytes":
        run.bytes_total, run.logged_cap = int(g[0]), int(g[1]) if g[1] else None
    elif kind == "cap_exceeded":
        run.cap_exceeded_line = True
    elif kind == "exact":
        run.exact[final_key(g[0])] = (g[1], g[2])
    elif kind == "eval_total":
        run.eval_ms = float(g[0])
    elif kind == "targets":
        if g[3] != "ok" or g[1] != g[2]:
            run.mismatches.append(m.group(0))
    elif kind == "chunk":
        run.ttt_curve.append((int(g[0]), float(g[2])))
    elif kind == "breakdown":
        run.breakdown.setdefault(final_key(g[0]), {})[g[1]] = (float(g[2]), int(g[3]), int(g[4]))
    elif kind == "error":
        run.errors.append(g[0])


def step_fields(line: str) -> dict[str, float]:
    """The `key:value` figures of a step line, by name: fields added to it later (throughput, MFU) do no harm."""
    return {k: float(v) for k, v in re.findall(rf"(\w+):{NUM}(?:ms)?(?=\s|$)", line)}


def apply_step_line(run: Run, step: int, line: str) -> None:
    f = step_fields(line)
    if "train_time" not in f:
        return
    run.steps, run.train_ms = step, f["train_time"]
    run.step_avg_ms = f.get("step_avg", run.step_avg_ms)
    if "train_loss" in f:
        run.train_curve.append((f["train_time"], f["train_loss"]))
        if not math.isfinite(f["train_loss"]) and run.nonfinite_loss_step is None:
            run.nonfinite_loss_step = step
    if "val_bpb" in f:
        run.val_curve.append((f["train_time"], f["val_bpb"]))


def read_run(path: Path) -> Run:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: cannot read it as a text log ({e.__class__.__name__}: {e})")
    lines = text.splitlines()
    separators = [i for i, line in enumerate(lines) if line == SEPARATOR]
    run = Run(path)
    run.runs_in_file = max(len(separators), 1)
    # the logged source comes before the separator; a reused RUN_ID appends runs, of which the last counts
    parse_lines(run, lines[separators[-1] + 1:] if separators else lines)
    if not (run.exact or run.cap_exceeded_line or run.errors or run.mismatches):
        raise BadInput(f"{path}: no final_*_exact line; expected a complete train_gpt.py log "
                       f"(a run still going, killed, or not a log at all)")
    run.flags = flags_of(run)
    return run


def flags_of(run: Run) -> list[str]:
    """Why a run cannot count towards a record; an empty list means it can."""
    flags = []
    cap = min(SIZE_CAP_BYTES, run.logged_cap or SIZE_CAP_BYTES)
    if run.cap_exceeded_line or (run.bytes_total is not None and run.bytes_total > cap):
        flags.append(f"over the {cap:,}-byte cap" + (f" ({run.bytes_total:,} bytes)" if run.bytes_total else ""))
    if run.train_seconds is not None and run.train_seconds > TRAIN_BUDGET_S:
        flags.append(f"training {run.train_seconds:.1f}s > {TRAIN_BUDGET_S:.0f}s")
    if run.eval_ms is not None and run.eval_ms / 1000.0 > EVAL_BUDGET_S:
        flags.append(f"evaluation {run.eval_ms / 1000.0:.1f}s > {EVAL_BUDGET_S:.0f}s")
    flags += [f"target-count mismatch: {line}" for line in run.mismatches]
    flags += [f"error: {e}" for e in run.errors]
    if run.nonfinite_loss_step is not None:
        flags.append(f"non-finite train_loss from step {run.nonfinite_loss_step}")
    flags += [f"non-finite {label} score" for label, (loss, bpb) in run.exact.items()
              if not (math.isfinite(float(loss)) and math.isfinite(float(bpb)))]
    if run.final is None:
        flags.append(f"no {run.final_label}_exact line" if run.final_label != "roundtrip"
                     else "no final_*_roundtrip_exact line")
    if run.bytes_total is None:
        flags.append("no 'Total submission size' line")
    if run.hparams.get("preflight") == "True":
        flags.append("a preflight (PREFLIGHT=1): 30 steps, scored on three TTT chunks")
    return flags


def log_paths(inputs: list[str]) -> tuple[list[Path], list[Path]]:
    """The log files named or held (*.txt, *.log) by the inputs, and the folders the named files lie in."""
    paths, folders = [], []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in LOG_SUFFIXES)
            if not found:
                raise BadInput(f"{p}: no *.txt or *.log files in this folder; expected train_gpt.py logs")
            paths += found
        elif p.is_file():
            paths.append(p)
            folders.append(p.parent)
        else:
            raise BadInput(f"{p}: no such file or folder; expected a train_gpt.py log or a folder of them")
    unique = list(dict.fromkeys(p.resolve() for p in paths))
    return [Path(p) for p in unique], list(dict.fromkeys(f.resolve() for f in folders))


# -----------------------------------------------------------------------------------------------------------------
# Groups and statistics
# -----------------------------------------------------------------------------------------------------------------


def configuration(run: Run) -> tuple:
    return tuple(sorted((k, v) for k, v in run.hparams.items() if k not in NOT_CONFIGURATION))


def group_runs(runs: list[Run]) -> list[list[Run]]:
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(configuration(run), []).append(run)
    return list(groups.values())


def differing_knobs(groups: list[list[Run]]) -> list[str]:
    """The knobs whose values tell the groups apart (a knob absent from a log counts as a value)."""
    keys = sorted({k for g in groups for k in g[0].hparams if k not in NOT_CONFIGURATION})
    return [k for k in keys if len({g[0].hparams.get(k) for g in groups}) > 1]


def log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), converging for x < (a+1)/(a+b+2)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b); the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) keeps the continued fraction in its fast range."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - log_beta(a, b))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * beta_continued_fraction(a, b, x) / a
    return 1.0 - front * beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_sf(t: float, df: float) -> float:
    """P(T >= t) for Student's t with df degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2) / 2 for t > 0."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def one_sided_t_test(values: list[float], reference: float, margin: float) -> dict | None:
    """H1: the mean is below reference - margin (lower bpb is better). The p-value is P(T >= t) with
    t = (reference - margin - mean) / (sd / sqrt(n)) and n - 1 degrees of freedom; None when sd is 0 or n < 2."""
    n = len(values)
    if n < 2:
        return None
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    if sd == 0.0:
        return None
    t = (reference - margin - mean) / (sd / math.sqrt(n))
    return dict(reference=reference, margin=margin, n=n, df=n - 1, t=t, p_value=student_t_sf(t, n - 1))


@dataclass
class Summary:
    runs: list[Run]
    counted: list[Run]  # unflagged runs: the ones every mean is over
    warnings: list[str]

    def values(self, index: int) -> list[float]:
        return [r.final[index] for r in self.counted]


def summarise_group(runs: list[Run], siblings: list[Run]) -> Summary:
    counted = [r for r in runs if not r.flags]
    warnings = []
    if len(counted) < MIN_SEEDS:
        warnings.append(f"{len(counted)} seed(s) averaged; a record needs at least {MIN_SEEDS}")
    for r in runs:
        if r.flags:
            warnings.append(f"{r.run_id} left out of the means: {'; '.join(r.flags)}")
        if r.runs_in_file > 1:
            warnings.append(f"{r.path} holds {r.runs_in_file} runs (a reused RUN_ID); only the last is read")
    seeds = [r.seed for r in runs if r.seed is not None]
    for seed in sorted({s for s in seeds if seeds.count(s) > 1}):
        warnings.append(f"seed {seed} appears {seeds.count(seed)} times: repeated seeds are not independent")
    warnings += run_id_gaps([r.run_id for r in runs])
    for label, getter in (("hardware", lambda r: r.hardware), ("code size", lambda r: r.bytes_code),
                          ("torch", lambda r: r.versions.get("torch"))):
        if len({getter(r) for r in runs}) > 1:
            warnings.append(f"{label} differs between runs of this configuration")
    given = {r.path for r in runs}
    for s in siblings:
        if s.path not in given and configuration(s) == configuration(runs[0]):
            warnings.append(f"{s.path} has this configuration (seed {s.seed}) but was not given")
    return Summary(runs, counted, warnings)


def run_id_gaps(run_ids: list[str]) -> list[str]:
    """Run ids sharing a stem and ending in numbers should count up without a gap: rec_s1, rec_s3 -> rec_s2."""
    stems: dict[str, set[int]] = {}
    for rid in run_ids:
        m = re.fullmatch(r"(.*?)(\d+)", rid)
        if m:
            stems.setdefault(m.group(1), set()).add(int(m.group(2)))
    warnings = []
    for stem, numbers in stems.items():
        missing = sorted(set(range(min(numbers), max(numbers) + 1)) - numbers)
        if len(numbers) > 1 and 0 < len(missing) <= MAX_SEED_GAP:
            warnings.append(f"run ids {stem}* skip {', '.join(f'{stem}{n}' for n in missing)}: seeds left out?")
    return warnings


def siblings_of(folders: list[Path], given: list[Path]) -> list[Run]:
    """Logs lying beside the named files but not named: readable, complete ones only."""
    found = []
    for folder in folders:
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.suffix in LOG_SUFFIXES and p.resolve() not in given:
                try:
                    found.append(read_run(p.resolve()))
                except BadInput:
                    pass  # not a log of a finished run: nothing to leave out
    return found


# -----------------------------------------------------------------------------------------------------------------
# Printing
# -----------------------------------------------------------------------------------------------------------------


def fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def exact_bpb(run: Run, label: str) -> str:
    pair = run.exact.get(label)
    return pair[1] if pair else "-"


def table_rows(runs: list[Run]) -> list[list[str]]:
    rows = [["run", "seed", "hardware", "steps", "ms/step", "stop", "train_s", "prequant_bpb", "roundtrip_bpb",
             "sliding_bpb", "ttt_bpb", "artifact", "code", "total", "eval_s", "flags"]]
    for r in runs:
        stop = "wallclock" if r.wallclock_stop else ("iterations" if r.steps is not None else "-")
        rows.append([r.run_id, fmt(r.seed), r.hardware or "-", fmt(r.steps), fmt(r.step_avg_ms, ".2f"), stop,
                     fmt(r.train_seconds, ".1f"), *(exact_bpb(r, label) for label in FINAL_LABELS),
                     fmt(r.bytes_model), fmt(r.bytes_code), fmt(r.bytes_total),
                     fmt(None if r.eval_ms is None else r.eval_ms / 1000.0, ".1f"),
                     "FLAGGED: " + "; ".join(r.flags) if r.flags else "ok"])
    return rows


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


def print_summary(summary: Summary, reference: float | None, margin: float) -> dict | None:
    counted = summary.counted
    print(f"seeds averaged: {len(counted)} of {len(summary.runs)} ({', '.join(r.run_id for r in counted) or '-'})")
    test = None
    if counted:
        for name, index in (("val_bpb", 1), ("val_loss", 0)):
            values = summary.values(index)
            sd = statistics.stdev(values) if len(values) > 1 else None
            print(f"  {name}: mean {statistics.fmean(values):.8f}  std {fmt(sd, '.8f')}")
        if reference is not None:
            bpbs = summary.values(1)
            for m in (0.0, margin):
                result = one_sided_t_test(bpbs, reference, m)
                if m == margin:
                    test = result
                what = f"beats {reference:.8f} by > {m:.7f} bpb"
                if result is None:
                    print(f"  one-sided t-test ({what}): undefined (needs 2+ seeds with a nonzero spread)")
                else:
                    print(f"  one-sided t-test ({what}): t = {result['t']:.6f}, df = {result['df']}, "
                          f"p = {result['p_value']:.6g}")
    for w in summary.warnings:
        print(f"  warning: {w}")
    return test


def buckets(run: Run, evaluation: str, grouping: str) -> dict[str, tuple[float | None, float, float]]:
    """Bucket -> (bpb, share of the evaluation's bits, nats) of one grouping, in the logged order; bpb is None for a
    bucket without bytes (BOS is charged but counts no byte)."""
    rows = {k.split(":", 1)[1]: v for k, v in run.breakdown.get(evaluation, {}).items()
            if k.split(":", 1)[0] == grouping}
    total = sum(nats for nats, _, _ in rows.values()) or 1.0
    return {b: (nats / math.log(2) / nbytes if nbytes else None, nats / total, nats)
            for b, (nats, _, nbytes) in rows.items()}


def short_name(evaluation: str) -> str:
    return next(name for name, label in EVALUATIONS.items() if label == evaluation)


def breakdown_cell(entry: tuple | None) -> str:
    """'bpb share' of a bucket in one evaluation."""
    bpb, share, _ = entry or (None, None, None)
    return f"{fmt(bpb, '.4f'):>7} {fmt(share, '.1%'):>6}"


def ttt_gain_cell(before: tuple | None, after: tuple | None, saved: float) -> str:
    """How much TTT lowered a bucket's bpb below the sliding evaluation's (the same windows, so every bucket holds
    the same targets), and the bucket's share of all the nats TTT saved."""
    if not (before and after):
        return ""
    gain = None if before[0] is None else before[0] - after[0]
    return f"{fmt(gain, '+.4f'):>8} {fmt((before[2] - after[2]) / saved if saved else None, '.1%'):>6}"


def breakdown_rows(run: Run, grouping: str) -> list[list[str]]:
    """A table of one grouping: a column per evaluation, and with sliding and TTT (SLIDING_EVAL=1), TTT's gain."""
    tables = {e: buckets(run, e, grouping) for e in FINAL_LABELS if e in run.breakdown}
    gain = "final_sliding" in tables and "final_ttt" in tables
    before, after = (tables["final_sliding"], tables["final_ttt"]) if gain else ({}, {})
    saved = sum(v[2] for v in before.values()) - sum(v[2] for v in after.values())
    rows = [[grouping] + [f"{short_name(e):>7} bpb  share" for e in tables] + ["ttt gain  of all" if gain else ""]]
    for bucket in dict.fromkeys(b for table in tables.values() for b in table):
        rows.append([bucket] + [breakdown_cell(table.get(bucket)) for table in tables.values()] +
                    [ttt_gain_cell(before.get(bucket), after.get(bucket), saved)])
    return rows


def print_breakdown(run: Run) -> None:
    """Where the bits go, from the *_breakdown lines: bits per byte and share of the bits per bucket."""
    if not run.breakdown:
        print(f"== breakdown of {run.run_id}: no *_breakdown lines in {run.path}")
        return
    print(f"== breakdown of {run.run_id}: bits per byte and share of all bits per bucket")
    for grouping in GROUPINGS:
        print_table(breakdown_rows(run, grouping))
    print()


# -----------------------------------------------------------------------------------------------------------------
# The submission: submission.json, README skeleton, logs
# -----------------------------------------------------------------------------------------------------------------


def mean_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def common(values: list):
    """The value all runs share, else None (a disagreement is warned about in the summary)."""
    return values[0] if values and len(set(values)) == 1 else None


def seed_result(run: Run) -> dict:
    def pair(label, index):
        score = run.score(label)
        return score[index] if score else None
    final = run.final
    return dict(
        run_id=run.run_id, log=run.path.name, seed=run.seed,
        val_bpb=final[1] if final else None, val_loss=final[0] if final else None,
        pre_quant_val_bpb=pair("final_prequant", 1), pre_quant_val_loss=pair("final_prequant", 0),
        roundtrip_val_bpb=pair("roundtrip", 1), roundtrip_val_loss=pair("roundtrip", 0),
        sliding_val_bpb=pair("final_sliding", 1), ttt_val_bpb=pair("final_ttt", 1),
        artifact_bytes=run.bytes_total, bytes_model=run.bytes_model, bytes_code=run.bytes_code,
        steps=run.steps, step_avg_ms=run.step_avg_ms, stopped_by_wallclock=run.wallclock_stop,
        train_time_seconds=run.train_seconds, eval_time_seconds=None if run.eval_ms is None else run.eval_ms / 1e3,
        hardware=run.hardware, flags=run.flags)


def all_or_none(values: list) -> bool | None:
    """True if every run satisfies it, False if one does not, None if some run does not say."""
    if any(v is False for v in values):
        return False
    return None if any(v is None for v in values) else True


def compliance(runs: list[Run]) -> dict:
    def under(value, limit):
        return None if value is None else value <= limit
    ttt = [r.hparams.get("ttt_enabled") for r in runs]
    return dict(
        artifact_under_16mb=all_or_none([under(r.bytes_total, SIZE_CAP_BYTES) and not r.cap_exceeded_line
                                         if r.bytes_total is not None else None for r in runs]),
        train_under_600s=all_or_none([under(r.train_seconds, TRAIN_BUDGET_S) for r in runs]),
        eval_under_600s=all_or_none([under(None if r.eval_ms is None else r.eval_ms / 1e3, EVAL_BUDGET_S)
                                     for r in runs]),
        # train_gpt.py's only TTT is score-first: each chunk is scored before it is trained on
        score_first_ttt=None if None in ttt else all(v == "True" for v in ttt),
        all_targets_scored=all(not r.mismatches for r in runs),
        three_seeds=len([r for r in runs if not r.flags]) >= MIN_SEEDS)


def track_of(runs: list[Run]) -> str | None:
    """The rule train_gpt.py applies to its own submission.json: 8 GPUs, a wallclock cap within 600 s, no SMOKE."""
    def on_track(r):
        if r.hardware is None or not r.hparams:
            return None
        cap = float(r.hparams.get("max_wallclock_seconds", "0"))
        return bool(re.match(r"8x ", r.hardware)) and 0 < cap <= TRAIN_BUDGET_S and r.hparams.get("smoke") != "True"
    verdicts = [on_track(r) for r in runs]
    return None if None in verdicts else ("10min_16mb" if all(verdicts) else "non_record")


def submission(summary: Summary, test: dict | None, meta: dict) -> dict:
    runs, counted = summary.runs, summary.counted
    keys = [str(r.seed) if r.seed is not None else r.run_id for r in runs]
    if len(set(keys)) < len(keys):
        keys = [r.run_id for r in runs]
    bpbs, losses = summary.values(1), summary.values(0)
    return dict(
        **meta, track=track_of(runs),
        val_bpb=mean_or_none(bpbs), val_loss=mean_or_none(losses),
        val_bpb_std=statistics.stdev(bpbs) if len(bpbs) > 1 else None,
        val_loss_std=statistics.stdev(losses) if len(losses) > 1 else None,
        pre_quant_val_bpb=mean_or_none([(r.score("final_prequant") or (None, None))[1] for r in counted]),
        roundtrip_val_bpb=mean_or_none([(r.score("roundtrip") or (None, None))[1] for r in counted]),
        seeds=[r.seed for r in counted],
        seed_results=dict(zip(keys, (seed_result(r) for r in runs))),
        bytes_total=max((r.bytes_total for r in runs if r.bytes_total is not None), default=None),
        bytes_code=max((r.bytes_code for r in runs if r.bytes_code is not None), default=None),
        hardware=common([r.hardware for r in runs]),
        pytorch_version=common([r.versions.get("torch") for r in runs]),
        python_version=common([r.versions.get("python") for r in runs]),
        cuda_version=common([r.versions.get("cuda") for r in runs]),
        compliance=compliance(runs),
        significance=test,
        warnings=summary.warnings)


def readme(info: dict, summary: Summary) -> str:
    def cell(value, spec=""):
        if isinstance(value, bool):
            return "yes" if value else "no"
        return "null" if value is None else format(value, spec)
    runs = summary.runs
    lines = [f"# {cell(info['name'])}", "", cell(info["blurb"]), "",
             "Generated by `tools/summarize.py` from the logs in this folder; every figure below is copied from "
             "them (`null`: no log says).", "",
             "## Results per seed", "",
             "| seed | run | val_bpb | val_loss | steps | ms/step | train s | eval s | artifact bytes | flags |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        loss, bpb = r.exact.get(r.final_label, ("null", "null"))
        lines.append(f"| {cell(r.seed)} | {r.run_id} | {bpb} | {loss} | {cell(r.steps)} | "
                     f"{cell(r.step_avg_ms, '.2f')} | {cell(r.train_seconds, '.1f')} | "
                     f"{cell(None if r.eval_ms is None else r.eval_ms / 1e3, '.1f')} | {cell(r.bytes_total, ',')} | "
                     f"{'; '.join(r.flags) or 'ok'} |")
    lines += ["", f"Mean over {len(summary.counted)} seed(s): val_bpb {cell(info['val_bpb'], '.8f')} "
              f"(std {cell(info['val_bpb_std'], '.8f')}), val_loss {cell(info['val_loss'], '.8f')}.", ""]
    test = info["significance"]
    if test:
        lines += [f"One-sided t-test of beating {test['reference']:.8f} bpb by more than {test['margin']:.7f} bpb "
                  f"(the record margin of 0.005 nats is {RECORD_MARGIN_BPB:.7f}): t = {test['t']:.6f}, "
                  f"df = {test['df']}, p = {test['p_value']:.6g}.", ""]
    lines += ["## Diagnostics (exact bpb)", "", "| seed | pre-quant | round trip | sliding | final |",
              "|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {cell(r.seed)} | " + " | ".join(
            r.exact.get(label, (None, "null"))[1] for label in ("final_prequant", "roundtrip", "final_sliding")) +
            f" | {r.exact.get(r.final_label, (None, 'null'))[1]} |")
    c = info["compliance"]
    lines += ["", "## Compliance", "",
              f"- Artifact (code + compressed weights) against the decimal cap of {SIZE_CAP_BYTES:,} bytes: largest "
              f"{cell(info['bytes_total'], ',')} bytes (code {cell(info['bytes_code'], ',')}); under the cap: "
              f"{cell(c['artifact_under_16mb'])}.",
              f"- Training (timed steps + GPTQ calibration) within {TRAIN_BUDGET_S:.0f} s: "
              f"{cell(c['train_under_600s'])}; longest "
              f"{cell(max((r.train_seconds for r in runs if r.train_seconds is not None), default=None), '.1f')} s.",
              f"- Evaluation within {EVAL_BUDGET_S:.0f} s: {cell(c['eval_under_600s'])}; longest "
              f"{cell(max((r.eval_ms / 1e3 for r in runs if r.eval_ms is not None), default=None), '.1f')} s.",
              f"- Score-first TTT (each chunk scored before it is adapted on; the last chunk never trained on): "
              f"{cell(c['score_first_ttt'])}. Every validation target scored once: {cell(c['all_targets_scored'])}.",
              "- No validation data in training or calibration: train_gpt.py trains and calibrates GPTQ on "
              "`fineweb_train_*` shards only and reads `fineweb_val_*` for evaluation alone (the code is at the top "
              "of each log).",
              f"- Hardware: {cell(info['hardware'])}; torch {cell(info['pytorch_version'])}, "
              f"python {cell(info['python_version'])}, CUDA {cell(info['cuda_version'])}.", ""]
    if summary.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in summary.warnings] + [""]
    return "\n".join(lines)


def strict_json(value):
    """`value` without NaN or Infinity, which strict JSON parsers reject: such a number becomes null, and in a dict a
    `<key>_null_reason` beside it says what the log held."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out[k] = strict_json(v)
            if isinstance(v, float) and not math.isfinite(v):
                out[f"{k}_null_reason"] = f"the log holds {v}: the run diverged"
        return out
    if isinstance(value, list):
        return [strict_json(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_submission(folder: Path, summary: Summary, test: dict | None, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    info = submission(summary, test, meta)
    text = json.dumps(strict_json(info), indent=2, allow_nan=False)
    (folder / "submission.json").write_text(text + "\n", encoding="utf-8")
    (folder / "README.md").write_text(readme(info, summary), encoding="utf-8")
    for r in summary.runs:
        if r.path.resolve() != (folder / r.path.name).resolve():
            shutil.copy2(r.path, folder / r.path.name)
    print(f"wrote {folder / 'submission.json'}, {folder / 'README.md'} and {len(summary.runs)} log(s)")


# -----------------------------------------------------------------------------------------------------------------
# Plots
# -----------------------------------------------------------------------------------------------------------------


def pyplot(option: str):
    """matplotlib.pyplot, drawing to files; without matplotlib, one line naming the option that needs it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInput(f"{option} needs matplotlib, which is not installed: pip install matplotlib")
    return plt


def plot(path: Path, runs: list[Run]) -> None:
    plt = pyplot("--plot")
    fig, (train_ax, ttt_ax) = plt.subplots(1, 2, figsize=(13, 4.5))
    val_ax = train_ax.twinx()
    for i, r in enumerate(runs):
        color, label = f"C{i % 10}", f"{r.run_id} (seed {fmt(r.seed)})"
        if r.train_curve:
            train_ax.plot([t / 1e3 for t, _ in r.train_curve], [v for _, v in r.train_curve], color=color,
                          label=label)
        if r.val_curve:
            val_ax.plot([t / 1e3 for t, _ in r.val_curve], [v for _, v in r.val_curve], "o--", color=color)
        if r.ttt_curve:
            ttt_ax.plot([c for c, _ in r.ttt_curve], [v for _, v in r.ttt_curve], ".-", color=color, label=label)
    train_ax.set(xlabel="training time (s)", ylabel="train loss (nats/byte, lines)", title="training")
    val_ax.set_ylabel("validation bpb (circles)")
    ttt_ax.set(xlabel="chunk", ylabel="running bpb", title="score-first TTT")
    for ax in (train_ax, ttt_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def breakdown_series(runs: list[Run], evaluations: list[str] | None) -> list[tuple[str, Run, str]]:
    """(legend, run, evaluation) to draw: the named evaluations of every run; by default every evaluation of a
    single run (before and after TTT), or each run's final one (runs side by side)."""
    series = []
    for r in runs:
        chosen = evaluations or (list(r.breakdown) if len(runs) == 1 else [r.final_label])
        series += [(f"{r.run_id} {short_name(e)}", r, e) for e in FINAL_LABELS if e in chosen and e in r.breakdown]
    if not series:
        raise BadInput("--plot-breakdown: no *_breakdown lines for the chosen evaluations in these logs (train_gpt.py "
                       "logs them for every final evaluation unless EVAL_BREAKDOWN=0)")
    return series


def plot_breakdown(path: Path, runs: list[Run], evaluations: list[str] | None) -> None:
    """Bits per byte by bucket of each grouping, as bars side by side for each run or evaluation."""
    series = breakdown_series(runs, evaluations)
    plt = pyplot("--plot-breakdown")
    fig, axes = plt.subplots(2, 2, figsize=(14, 8))
    for ax, grouping in zip(axes.flat, GROUPINGS):
        tables = [buckets(r, e, grouping) for _, r, e in series]
        names = list(dict.fromkeys(b for t in tables for b in t if t[b][0] is not None))  # bpb needs bytes
        width = 0.8 / len(series)
        for i, ((legend, _, _), table) in enumerate(zip(series, tables)):
            xs = [j + (i - (len(series) - 1) / 2) * width for j, b in enumerate(names) if b in table]
            ax.bar(xs, [table[b][0] for b in names if b in table], width, label=legend, color=f"C{i % 10}")
        ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 8 else 0, fontsize=8)
        ax.set(title=f"by {grouping.replace('_', ' ')}", ylabel="bits per byte")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


# -----------------------------------------------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------------------------------------------


def evaluation_list(value: str) -> list[str]:
    """--evals: short names of evaluations, comma-separated, as their log labels."""
    unknown = [e for e in value.split(",") if e not in EVALUATIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown evaluation {unknown[0]!r}; expected some of "
                                         f"{', '.join(EVALUATIONS)}")
    return [EVALUATIONS[e] for e in value.split(",")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", help="train_gpt.py logs, or folders of them (*.txt, *.log)")
    p.add_argument("--reference", type=float, metavar="BPB", help="score to beat, e.g. the current record's bpb")
    p.add_argument("--margin", type=float, default=RECORD_MARGIN_BPB, metavar="BPB",
                   help=f"required improvement (default 0.005 nats = {RECORD_MARGIN_BPB:.7f} bpb)")
    p.add_argument("--write-submission", type=Path, metavar="DIR",
                   help="write DIR/submission.json, DIR/README.md and copy the logs (one configuration only)")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="train loss, val bpb and TTT running bpb (matplotlib)")
    p.add_argument("--breakdown", action="store_true",
                   help="print each run's breakdown: bpb and share of the bits by slot, byte class, document position "
                        "and context, per evaluation, and what TTT gains where")
    p.add_argument("--plot-breakdown", type=Path, metavar="FILE.png",
                   help="bars of bpb by slot, class, document position and context (matplotlib): every evaluation of "
                        "one run, or the final one of each run, or the --evals of each")
    p.add_argument("--evals", type=evaluation_list, metavar="LIST",
                   help=f"evaluations for --plot-breakdown, comma-separated from {', '.join(EVALUATIONS)}")
    for name in ("author", "github-id", "name", "blurb", "date"):
        p.add_argument(f"--{name}", help=f"submission.json '{name.replace('-', '_')}' (null if not given)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        paths, folders = log_paths(args.logs)
        runs = [read_run(p) for p in paths]
        siblings = siblings_of(folders, paths)
        groups = group_runs(runs)
        knobs = differing_knobs(groups)
        summaries, tests = [], []
        for i, group in enumerate(groups):
            title = ", ".join(f"{k}={group[0].hparams.get(k, '(absent)')}" for k in knobs)
            print(f"== configuration {i + 1} of {len(groups)}" + (f": {title}" if title else ""))
            print_table(table_rows(group))
            summary = summarise_group(group, siblings)
            tests.append(print_summary(summary, args.reference, args.margin))
            summaries.append(summary)
            print()
        if args.write_submission:
            if len(groups) > 1:
                raise BadInput(f"{args.write_submission}: the logs hold {len(groups)} configurations (differing in "
                               f"{', '.join(knobs)}); expected the seeds of one")
            meta = dict(author=args.author, github_id=args.github_id, name=args.name, blurb=args.blurb,
                        date=args.date)
            write_submission(args.write_submission, summaries[0], tests[0], meta)
        if args.breakdown:
            for r in runs:
                print_breakdown(r)
        if args.plot:
            plot(args.plot, runs)
        if args.plot_breakdown:
            plot_breakdown(args.plot_breakdown, runs, args.evals)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
