"""Hyperparameters: the reference defaults, parsing of environment values, and every user mistake (wrong type, out
of range, inconsistent combination, wrong vocabulary, missing files) stopped before any heavy work with one
`error: ...` line that names the variable and its value, exit status 2 and no traceback."""
import json
import re

import pytest
import torch

import train_gpt
from conftest import SCRIPT, TINY, run_main, run_script, tiny_env

# Every environment variable the script reads as a knob, found in its source so that a new knob is covered too.
KNOB_NAMES = sorted(set(re.findall(r'\b(?:knob|env)\("([A-Z][A-Z0-9_]*)"', SCRIPT.read_text())))


def clear_knobs(monkeypatch):
    for name in set(KNOB_NAMES) | set(TINY) | {"DATA_PATH", "TOKENIZER_PATH", "WORLD_SIZE", "SMOKE", "RUN_ID"}:
        monkeypatch.delenv(name, raising=False)


def set_env(monkeypatch, env: dict):
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_knob_names_found():
    """The source scan above sees the knobs (else the defaults test would not isolate anything)."""
    assert {"TRAIN_SEQ_LEN", "PATCH_SIZE", "WORLD_SIZE", "SMOKE", "DATA_PATH", "TTT_CHUNK_TOKENS"} <= set(KNOB_NAMES)
    assert len(KNOB_NAMES) > 60


# ---------------------------------------------------------------------------------------------------------------
# Defaults and parsing
# ---------------------------------------------------------------------------------------------------------------

REFERENCE_DEFAULTS = dict(
    vocab_size=260, train_seq_len=2047, patch_size=8, train_batch_tokens=524_032, val_batch_size=524_032,
    model_dim=480, num_heads=6, num_kv_heads=3, num_layers=5, encoder_repeats=2, decoder_layers=7, decoder_heads=4,
    latent_dim=192, mlp_mult=2, rope_base=10000.0, qk_gain_init=1.5, sigreg_slices=256,
    matrix_lr=0.025, embed_lr=0.1, head_lr=0.02, scalar_lr=0.025,
    muon_momentum_warmup_start=0.92, muon_momentum_warmup_steps=1500, muon_backend_steps=5,
    beta1=0.9, beta2=0.95, adam_eps=1e-8,
    warmdown_iters=3500, warmup_steps=20, max_wallclock_seconds=600.0,
    weight_avg="ema", ema_decay=0.997, swa_every=50, swa_start_scale=0.2,
    ttt_enabled=True, ttt_lr=0.002, ttt_epochs=2, ttt_chunk_tokens=32_768, ttt_momentum=0.9, ttt_batch_seqs=32,
    ttt_grad_clip=1.0, val_sliding_stride=256,
    ce_weight=3.0, sigreg_weight=0.02,
    world_size=1, smoke=False, eval_only="", collective_timeout_seconds=300.0,
    # moved from the reference's values by measurement (README: compute allocation, training recipe); REFERENCE in
    # conftest
    decoder_dim=480, decoder_window=128, latent_per_slot=True, latent_inject_layers=2, latent_norm=True,
    ngram_buckets=4096, ngram_dim=120, smear_gate=True,
    logit_softcap=30.0, jepa_weight=0.0, warmdown_frac=0.72, lr_floor=0.1, muon_momentum=0.85, muon_row_norm=True,
    weight_decay=0.0, late_qat_threshold=0.0,
    data_path="./data/datasets/fineweb10B_byte260", tokenizer_path="./data/tokenizers/fineweb_pure_byte_260.json",
)


def test_reference_defaults(monkeypatch):
    clear_knobs(monkeypatch)
    args = train_gpt.Hyperparameters()
    actual = {name: getattr(args, name) for name in REFERENCE_DEFAULTS}
    assert actual == REFERENCE_DEFAULTS
    for name, value in REFERENCE_DEFAULTS.items():  # 600 == 600.0 above; the kinds must match too
        assert type(actual[name]) is type(value), name
    assert args.window == 2048 and args.window // args.patch_size == 256
    assert args.grad_accum_steps == 8
    assert re.fullmatch(r"[0-9a-f-]{36}", args.run_id)  # a fresh uuid per run


def test_size_knobs_follow_model_dim_and_the_latent_feeds_at_most_every_decoder_block(tiny_args):
    args = tiny_args(MODEL_DIM=64, DECODER_LAYERS=1, LATENT_INJECT_LAYERS=3)
    assert (args.decoder_dim, args.ngram_dim, args.latent_inject_layers) == (64, 16, 1)
    args = tiny_args(MODEL_DIM=64, DECODER_DIM=48, NGRAM_DIM=8, DECODER_LAYERS=3, LATENT_INJECT_LAYERS=3)
    assert (args.decoder_dim, args.ngram_dim, args.latent_inject_layers) == (48, 8, 3)


def test_auto_is_accepted_where_a_knob_has_an_automatic_value(tiny_args):
    """"auto" stands for a knob's automatic value: the default of the knobs whose default is automatic, and
    WARMDOWN_FRAC's alternative to its numeric default (a warmdown of WARMDOWN_ITERS steps' worth)."""
    args = tiny_args(DECODER_DIM="auto", NGRAM_DIM="auto", WARMDOWN_FRAC="auto")
    assert (args.decoder_dim, args.ngram_dim, args.warmdown_frac) == (32, 8, None)
    assert tiny_args(WARMDOWN_FRAC="").warmdown_frac == 0.72  # unset


@pytest.mark.parametrize("world, accum", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_grad_accum_steps_from_world_size(monkeypatch, world, accum):
    clear_knobs(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    args = train_gpt.Hyperparameters()
    assert (args.world_size, args.grad_accum_steps) == (world, accum)
    assert args.world_size * args.grad_accum_steps == 8


def test_environment_values_override_defaults(monkeypatch, corpus):
    clear_knobs(monkeypatch)
    set_env(monkeypatch, tiny_env(corpus, MATRIX_LR="0.5", WEIGHT_AVG="swa", QUANT="rtn", EVAL_ONLY="", SEED="0"))
    args = train_gpt.Hyperparameters()
    assert (args.model_dim, args.train_seq_len, args.patch_size, args.train_batch_tokens) == (32, 63, 4, 1008)
    assert args.matrix_lr == 0.5 and type(args.matrix_lr) is float
    assert args.max_wallclock_seconds == 0.0 and type(args.max_wallclock_seconds) is float
    assert (args.weight_avg, args.quant, args.seed, args.eval_only) == ("swa", "rtn", 0, "")
    assert args.data_path == str(corpus)
    assert args.embed_lr == 0.1  # untouched knobs keep their defaults
    train_gpt.check_inputs(args)  # the tiny configuration itself is valid: each bad case below changes one thing


@pytest.mark.parametrize("raw, value", [("1", True), ("true", True), ("YES", True), (" on ", True),
                                        ("0", False), ("False", False), ("no", False), ("off", False)])
def test_boolean_spellings(monkeypatch, raw, value):
    clear_knobs(monkeypatch)
    monkeypatch.setenv("USE_COMPILE", raw)
    monkeypatch.setenv("SLIDING_EVAL", raw)
    args = train_gpt.Hyperparameters()
    assert args.use_compile is value and args.sliding_eval is value


def test_empty_value_means_default(monkeypatch):
    clear_knobs(monkeypatch)
    monkeypatch.setenv("MODEL_DIM", "")
    monkeypatch.setenv("USE_COMPILE", "")
    args = train_gpt.Hyperparameters()
    assert args.model_dim == 480 and args.use_compile is True


def test_smoke_changes_defaults_but_environment_wins(monkeypatch):
    clear_knobs(monkeypatch)
    monkeypatch.setenv("SMOKE", "1")
    monkeypatch.setenv("MODEL_DIM", "64")
    args = train_gpt.Hyperparameters()
    assert args.smoke is True
    assert args.model_dim == 64  # environment
    assert (args.train_seq_len, args.num_layers, args.iterations) == (511, 2, 200)  # SMOKE_DEFAULTS
    assert args.data_path == train_gpt.EMBEDDED_SAMPLE_DIR
    assert args.matrix_lr == 0.025  # not in SMOKE_DEFAULTS: the reference default


# ---------------------------------------------------------------------------------------------------------------
# Bad environments: one change from the valid tiny configuration each
# ---------------------------------------------------------------------------------------------------------------


# id, overrides ("{tmp}" is a scratch folder), (variable, value) pairs the message must show as VAR=value,
# further text the message must hold (what is expected), files to write under {tmp} first.
BAD = [
    # wrong type
    ("int-given-float", {"MODEL_DIM": "32.0"}, [("MODEL_DIM", "32.0")], ["integer"], {}),
    ("int-given-word", {"ITERATIONS": "many"}, [("ITERATIONS", "many")], ["integer"], {}),
    ("float-given-word", {"MATRIX_LR": "fast"}, [("MATRIX_LR", "fast")], ["number"], {}),
    ("bool-maybe", {"USE_COMPILE": "maybe"}, [("USE_COMPILE", "maybe")], ["0 or 1"], {}),
    ("bool-two", {"TTT_ENABLED": "2"}, [("TTT_ENABLED", "2")], ["0 or 1"], {}),
    ("world-size-word", {"WORLD_SIZE": "two"}, [("WORLD_SIZE", "two")], ["integer"], {}),
    # out of range
    ("layers-zero", {"NUM_LAYERS": "0"}, [("NUM_LAYERS", "0")], [">= 1"], {}),
    ("lr-negative", {"EMBED_LR": "-0.1"}, [("EMBED_LR", "-0.1")], [">= 0"], {}),
    ("ema-above-one", {"EMA_DECAY": "1.5"}, [("EMA_DECAY", "1.5")], ["<= 1"], {}),
    ("momentum-above-one", {"MUON_MOMENTUM": "1.01"}, [("MUON_MOMENTUM", "1.01")], ["<= 1"], {}),
    ("world-size-zero", {"WORLD_SIZE": "0"}, [("WORLD_SIZE", "0")], [">= 1"], {}),
    ("ema-nan", {"EMA_DECAY": "nan"}, [("EMA_DECAY", "nan")], ["expected"], {}),
    ("lr-inf", {"MATRIX_LR": "inf"}, [("MATRIX_LR", "inf")], ["expected"], {}),
    ("seed-beyond-64-bits", {"SEED": str(2**64)}, [("SEED", str(2**64))], ["expected"], {}),
    # choices
    ("weight-avg", {"WEIGHT_AVG": "mean"}, [("WEIGHT_AVG", "mean")], ["ema", "swa", "none"], {}),
    ("quant", {"QUANT": "int8"}, [("QUANT", "int8")], ["rtn", "gptq"], {}),
    # inconsistent combinations
    ("seq-not-patch-multiple", {"TRAIN_SEQ_LEN": "64"}, [("TRAIN_SEQ_LEN", "64"), ("PATCH_SIZE", "4")],
     ["multiple of PATCH_SIZE"], {}),
    ("patch-not-dividing-window", {"PATCH_SIZE": "5"}, [("TRAIN_SEQ_LEN", "63"), ("PATCH_SIZE", "5")],
     ["multiple of PATCH_SIZE"], {}),
    ("train-batch", {"TRAIN_BATCH_TOKENS": "1000"}, [("TRAIN_BATCH_TOKENS", "1000")], ["504"], {}),
    ("train-batch-world-2", {"WORLD_SIZE": "2", "TRAIN_BATCH_TOKENS": "756"}, [("TRAIN_BATCH_TOKENS", "756")],
     ["2 x 4 x 63", "504"], {}),
    ("val-batch", {"VAL_BATCH_SIZE": "1500"}, [("VAL_BATCH_SIZE", "1500")], ["504"], {}),
    ("heads-not-dividing-width", {"NUM_HEADS": "3"}, [("MODEL_DIM", "32"), ("NUM_HEADS", "3")], ["divid"], {}),
    ("odd-head-size", {"MODEL_DIM": "36", "NUM_HEADS": "4"}, [("MODEL_DIM", "36"), ("NUM_HEADS", "4")], ["even"], {}),
    ("kv-not-dividing-heads", {"NUM_HEADS": "4", "NUM_KV_HEADS": "3"}, [("NUM_HEADS", "4"), ("NUM_KV_HEADS", "3")],
     ["dividing NUM_HEADS"], {}),
    ("kv-more-than-heads", {"NUM_KV_HEADS": "4"}, [("NUM_HEADS", "2"), ("NUM_KV_HEADS", "4")],
     ["dividing NUM_HEADS"], {}),
    ("decoder-heads", {"DECODER_HEADS": "3"}, [("DECODER_DIM", "32"), ("DECODER_HEADS", "3")], ["divid"], {}),
    ("decoder-dim-odd-head", {"DECODER_DIM": "30"}, [("DECODER_DIM", "30"), ("DECODER_HEADS", "2")], ["even"], {}),
    ("decoder-window-negative", {"DECODER_WINDOW": "-8"}, [("DECODER_WINDOW", "-8")], [">= 0"], {}),
    ("ngram-dim-zero", {"NGRAM_DIM": "0"}, [("NGRAM_DIM", "0")], [">= 1"], {}),
    ("softcap-negative", {"LOGIT_SOFTCAP": "-30"}, [("LOGIT_SOFTCAP", "-30")], [">= 0"], {}),
    ("weight-decay-negative", {"WEIGHT_DECAY": "-0.04"}, [("WEIGHT_DECAY", "-0.04")], [">= 0"], {}),
    ("warmdown-frac-above-one", {"WARMDOWN_FRAC": "75"}, [("WARMDOWN_FRAC", "75")], ["<= 1"], {}),
    ("warmdown-frac-word", {"WARMDOWN_FRAC": "most"}, [("WARMDOWN_FRAC", "most")], ["number"], {}),
    ("auto-without-an-automatic-value", {"LR_FLOOR": "auto"}, [("LR_FLOOR", "auto")], ["number"], {}),
    ("lr-floor-negative", {"LR_FLOOR": "-0.1"}, [("LR_FLOOR", "-0.1")], [">= 0"], {}),
    ("patching-word", {"PATCHING": "word"}, [("PATCHING", "word")], ["fixed", "space"], {}),
    ("patch-max-under-fixed", {"PATCH_MAX": "12"}, [("PATCH_MAX", "12")], ["PATCHING=space", "PATCH_SIZE=4"], {}),
    ("patch-slots-under-fixed", {"PATCH_SLOTS": "20"}, [("PATCH_SLOTS", "20")], ["PATCHING=space", "16"], {}),
    ("patch-slots-too-few", {"PATCHING": "space", "PATCH_MAX": "8", "PATCH_SLOTS": "7"}, [("PATCH_SLOTS", "7")],
     ["PATCH_MAX=8 (8)"], {}),
    ("patch-slots-above-bytes", {"PATCHING": "space", "PATCH_SLOTS": "65"}, [("PATCH_SLOTS", "65")], ["(64)"], {}),
    ("world-size-3", {"WORLD_SIZE": "3"}, [("WORLD_SIZE", "3")], ["divisor of 8"], {}),
    ("world-size-16", {"WORLD_SIZE": "16"}, [("WORLD_SIZE", "16")], ["divisor of 8"], {}),
    ("stride-not-patch-multiple", {"VAL_SLIDING_STRIDE": "10"}, [("VAL_SLIDING_STRIDE", "10")],
     ["PATCH_SIZE=4"], {}),
    ("stride-beyond-seq", {"VAL_SLIDING_STRIDE": "64"}, [("VAL_SLIDING_STRIDE", "64")], ["TRAIN_SEQ_LEN=63"], {}),
    ("ttt-chunk", {"TTT_CHUNK_TOKENS": "200"}, [("TTT_CHUNK_TOKENS", "200")], ["64"], {}),
    ("ttt-freeze", {"TTT_FREEZE_BLOCKS": "3"}, [("TTT_FREEZE_BLOCKS", "3")], ["NUM_LAYERS=2"], {}),
    ("gptq-reserve-equal-cap", {"MAX_WALLCLOCK_SECONDS": "10", "GPTQ_RESERVE_SECONDS": "10"},
     [("GPTQ_RESERVE_SECONDS", "10"), ("MAX_WALLCLOCK_SECONDS", "10")], ["shorter"], {}),
    ("gptq-reserve-above-cap", {"MAX_WALLCLOCK_SECONDS": "20", "GPTQ_RESERVE_SECONDS": "30"},
     [("GPTQ_RESERVE_SECONDS", "30"), ("MAX_WALLCLOCK_SECONDS", "20")], ["shorter"], {}),
    # vocabulary and files
    ("vocab-256", {"VOCAB_SIZE": "256"}, [("VOCAB_SIZE", "256")], ["260"], {}),
    ("vocab-261", {"VOCAB_SIZE": "261"}, [("VOCAB_SIZE", "261")], ["260"], {}),
    ("tokenizer-missing", {"TOKENIZER_PATH": "{tmp}/missing.json"}, [("TOKENIZER_PATH", "{tmp}/missing.json")],
     [], {}),
    ("tokenizer-is-folder", {"TOKENIZER_PATH": "{tmp}"}, [("TOKENIZER_PATH", "{tmp}")], [], {}),
    ("tokenizer-unparseable", {"TOKENIZER_PATH": "{tmp}/tok.json"}, [("TOKENIZER_PATH", "{tmp}/tok.json")],
     ["JSON"], {"tok.json": '{"tokenizer_type": "pure_byte", '}),
    ("tokenizer-not-an-object", {"TOKENIZER_PATH": "{tmp}/tok.json"}, [("TOKENIZER_PATH", "{tmp}/tok.json")],
     ["pure_byte"], {"tok.json": "[260]"}),
    ("tokenizer-sentencepiece", {"TOKENIZER_PATH": "{tmp}/tok.json"}, [("TOKENIZER_PATH", "{tmp}/tok.json")],
     ["'sentencepiece'", "pure_byte"], {"tok.json": json.dumps({"tokenizer_type": "sentencepiece", "vocab_size": 260})}),
    ("tokenizer-vocab-1024", {"TOKENIZER_PATH": "{tmp}/tok.json"}, [("TOKENIZER_PATH", "{tmp}/tok.json")],
     ["1024", "260"], {"tok.json": json.dumps({"tokenizer_type": "pure_byte", "vocab_size": 1024})}),
    ("dataset-missing", {"DATA_PATH": "{tmp}/nowhere"}, [("DATA_PATH", "{tmp}/nowhere")],
     ["python3 data/prepare.py"], {}),
    ("dataset-folder-without-shards", {"DATA_PATH": "{tmp}"}, [("DATA_PATH", "{tmp}")],
     ["fineweb_train_*.bin", "python3 data/prepare.py"], {}),
    # a fresh checkout: neither the shards nor the tokenizer description that `data/prepare.py` writes exist
    ("dataset-and-tokenizer-missing", {"DATA_PATH": "{tmp}/data", "TOKENIZER_PATH": "{tmp}/data/tok.json"}, [],
     ["{tmp}/data", "python3 data/prepare.py"], {}),
    ("eval-only-missing", {"EVAL_ONLY": "{tmp}/model.ptz"}, [("EVAL_ONLY", "{tmp}/model.ptz")], ["No such file"], {}),
]
BAD_IDS = [case[0] for case in BAD]
assert len(set(BAD_IDS)) == len(BAD_IDS)


def prepare_case(case, tmp_path, corpus):
    """The environment of one bad case (files written), its (variable, value) pairs and expected text."""
    _, overrides, named, expected, files = case
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    fill = lambda s: s.replace("{tmp}", str(tmp_path))  # noqa: E731
    env = tiny_env(corpus, **{k: fill(v) for k, v in overrides.items()})
    return env, [(var, fill(value)) for var, value in named], [fill(s) for s in expected]


def assert_names(message: str, named, expected):
    assert "\n" not in message, message
    for var, value in named:  # VAR=value, the value possibly quoted, and not the prefix of a longer number
        assert re.search(rf"\b{var}=['\"]?{re.escape(value)}(?![0-9])", message), (var, value, message)
    for text in expected:
        assert text in message, (text, message)


@pytest.mark.parametrize("case", BAD, ids=BAD_IDS)
def test_bad_environment_raises_config_error(case, tmp_path, corpus, monkeypatch):
    env, named, expected = prepare_case(case, tmp_path, corpus)
    set_env(monkeypatch, env)
    with pytest.raises(train_gpt.ConfigError) as info:
        train_gpt.check_inputs(train_gpt.Hyperparameters())
    assert_names(str(info.value), named, expected)


# one per kind: type, boolean, range, choice, window/patch, batch divisibility, heads, KV heads, world size,
# vocabulary, tokenizer file, dataset, EVAL_ONLY
MAIN_IDS = ["int-given-word", "bool-maybe", "layers-zero", "quant", "seq-not-patch-multiple", "train-batch",
            "decoder-heads", "kv-not-dividing-heads", "world-size-3", "vocab-256", "tokenizer-sentencepiece",
            "dataset-missing", "eval-only-missing"]


def assert_fails_fast(code: int, stdout: str, stderr: str, cwd, named, expected):
    assert code == 2, (code, stdout, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert_names(lines[0], named, expected)
    assert "Traceback" not in stderr + stdout and "step:" not in stdout
    assert not (cwd / "logs").exists()  # stopped before the logger, the process group and the model


@pytest.mark.parametrize("case_id", MAIN_IDS)
def test_main_stops_with_one_error_line(case_id, tmp_path, corpus, monkeypatch, capsys):
    env, named, expected = prepare_case(BAD[BAD_IDS.index(case_id)], tmp_path, corpus)
    r = run_main(tmp_path / "run", env, monkeypatch, capsys)
    assert_fails_fast(r.code, r.stdout, r.stderr, r.cwd, named, expected)


def test_fresh_checkout_points_to_data_command(tmp_path, corpus):
    """A real process, as a user starts it: default DATA_PATH and TOKENIZER_PATH, neither prepared: the one line
    says how to get the data, and nothing else is printed (no traceback, no log)."""
    env = {k: v for k, v in tiny_env(corpus).items() if k not in ("DATA_PATH", "TOKENIZER_PATH")}
    env.update(DATA_PATH="", TOKENIZER_PATH="")  # empty = default, whatever the calling shell has set
    run = run_script(tmp_path, env, timeout=120)
    assert_fails_fast(run.proc.returncode, run.proc.stdout, run.proc.stderr, run.cwd, [], ["python3 data/prepare.py"])
    assert run.log == ""


def test_torchrun_two_processes_bad_value(tmp_path, corpus):
    env = tiny_env(corpus, TRAIN_BATCH_TOKENS="756")
    run = run_script(tmp_path, env, nproc=2, timeout=180)
    proc = run.proc
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr  # rank 0 speaks, rank 1 is silent
    assert_names(errors[0], [("TRAIN_BATCH_TOKENS", "756")], ["2 x 4 x 63", "504"])
    # both children exited with the user-mistake status; torchrun's own summary (and the traceback of its
    # ChildFailedError, if it prints one) is about the launcher, never a frame of train_gpt.py
    assert re.search(r"exitcode\s*:\s*2\b", proc.stderr), proc.stderr
    frames = re.findall(r'File "([^"]+)", line', proc.stderr)
    assert not [f for f in frames if f.endswith("train_gpt.py")], proc.stderr
    assert all("torch" in f or f.startswith("<frozen") for f in frames), frames
    assert "step:" not in proc.stdout and not (tmp_path / "logs").exists()


# ---------------------------------------------------------------------------------------------------------------
# The device, and knobs that follow the window
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("device", ["", "auto", "cuda"])
def test_without_cuda_a_run_must_ask_for_the_cpu(tmp_path, corpus, device, monkeypatch, capsys):
    """No silent fallback: auto (the default) and cuda stop before any work with one line naming DEVICE."""
    r = run_main(tmp_path, tiny_env(corpus, DEVICE=device), monkeypatch, capsys)
    hint = ["DEVICE=cpu", "SMOKE=1"] if device != "cuda" else ["CUDA is not available"]
    assert_fails_fast(r.code, r.stdout, r.stderr, r.cwd, [("DEVICE", device or "auto")], hint)


def test_device_cpu_runs_on_the_cpu_and_cuda_is_refused_in_process(tiny_args):
    args = tiny_args(DEVICE="cpu")
    assert train_gpt.Runtime(args).device.type == "cpu"
    train_gpt.check_device(args)  # asked for: no error
    if not torch.cuda.is_available():
        with pytest.raises(train_gpt.ConfigError, match="DEVICE=cuda"):
            train_gpt.check_device(tiny_args(DEVICE="cuda"))


def test_window_of_256_needs_no_stride_or_batch_override(monkeypatch):
    """TRAIN_SEQ_LEN=255: the default stride (256) would not fit the window, nor the default batches whole
    windows; their defaults follow the window, while explicit values are still checked."""
    clear_knobs(monkeypatch)
    monkeypatch.setenv("TRAIN_SEQ_LEN", "255")
    args = train_gpt.Hyperparameters()
    assert args.val_sliding_stride == 248  # the window's whole patches of 8, below 256
    assert args.train_batch_tokens == 524_032 // 2040 * 2040 and args.val_batch_size == args.train_batch_tokens
    monkeypatch.setenv("TRAIN_BATCH_TOKENS", "524032")
    with pytest.raises(train_gpt.ConfigError, match="TRAIN_BATCH_TOKENS=524032"):
        train_gpt.Hyperparameters()


def test_patches_of_6_need_no_stride_or_chunk_override(monkeypatch):
    """PATCH_SIZE=6 in a 2,046-byte window: 256 is no multiple of 6 nor 32,768 of the window; the defaults follow."""
    clear_knobs(monkeypatch)
    monkeypatch.setenv("PATCH_SIZE", "6")
    monkeypatch.setenv("TRAIN_SEQ_LEN", "2045")
    args = train_gpt.Hyperparameters()
    assert (args.val_sliding_stride, args.ttt_chunk_tokens) == (252, 16 * 2046)
    clear_knobs(monkeypatch)
    args = train_gpt.Hyperparameters()
    assert (args.val_sliding_stride, args.ttt_chunk_tokens) == (256, 32_768)  # the default window: unchanged


def test_stride_and_chunk_are_checked_only_when_their_evaluation_runs(tiny_args):
    tiny_args(VAL_SLIDING_STRIDE=64, TTT_CHUNK_TOKENS=200, TTT_ENABLED=0, SLIDING_EVAL=0)  # unused: no error
    for enabled in (dict(TTT_ENABLED=1), dict(TTT_ENABLED=0, SLIDING_EVAL=1)):
        with pytest.raises(train_gpt.ConfigError, match="VAL_SLIDING_STRIDE=64"):
            tiny_args(VAL_SLIDING_STRIDE=64, **enabled)


def test_a_window_of_256_runs_end_to_end(tmp_path, corpus):
    """TRAIN_SEQ_LEN=255 with the stride left to its default, through training, sliding and TTT evaluation."""
    env = {k: v for k, v in tiny_env(corpus, TRAIN_SEQ_LEN=255, TRAIN_BATCH_TOKENS=2040, VAL_BATCH_SIZE=4080,
                                     ITERATIONS=2, SLIDING_EVAL=1).items() if k != "VAL_SLIDING_STRIDE"}
    env["VAL_SLIDING_STRIDE"] = ""  # empty = default, whatever the calling shell has set
    run = run_script(tmp_path, env, timeout=240)
    assert run.proc.returncode == 0, run.proc.stderr[-2000:]
    assert "hparam val_sliding_stride=252" in run.log  # patches of 4 here
    assert run.lines("final_sliding_exact") and run.lines("final_ttt_exact")
