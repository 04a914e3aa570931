"""Byte-level JEPA encoder-decoder for the Parameter Golf challenge (16,000,000-byte artifact, 600 s on 8xH100).

A patch encoder reads the byte stream in patches (PATCH_SIZE bytes, or words) and predicts the next patch's latent;
a causal byte decoder predicts every byte from the bytes before it, conditioned on that prediction.
Training: Muon + Adam, wallclock-capped, EMA/SWA. Artifact: int6 (GPTQ or RTN) + LZMA, rate-controlled to the cap.
Evaluation: exact bits per byte, sliding windows, score-first test-time training.

Run:  torchrun --standalone --nproc_per_node=8 train_gpt.py        (knobs: environment variables, see Hyperparameters)
      SMOKE=1 python3 train_gpt.py                                  (small model on an embedded sample, CPU or GPU)
"""
from __future__ import annotations

import collections
import copy
import functools
import io
import json
import lzma
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# ---- Hyperparameters: every knob, read from the environment, checked before any heavy work ----------------------

SIZE_CAP_BYTES = 16_000_000  # the challenge's limit on code + compressed weights (decimal bytes)


class ConfigError(ValueError):
    """A user mistake (environment, files, data): reported as one line, without a traceback."""


class RunError(RuntimeError):
    """The run cannot go on: one `error:` line in the log and on stderr, no traceback, and this exit code."""
    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code or self.exit_code


BOOLEANS = dict.fromkeys(("1", "true", "yes", "on"), True) | dict.fromkeys(("0", "false", "no", "off"), False)


def env(name: str, default, kind: type | None = None, lo=None, hi=None, choices=None, auto: bool = False):
    """One knob from the environment or its default, parsed, range-checked; "auto": None (default None or auto=True)."""
    kind = kind or type(default)
    raw = os.environ.get(name, "")
    if raw == "auto" and (auto or default is None):  # decided at run time
        return None
    try:
        value = default if raw == "" else BOOLEANS[raw.strip().lower()] if kind is bool else kind(raw)
    except (KeyError, ValueError):
        expected = {int: "an integer", float: "a number", bool: "0 or 1"}.get(kind, kind.__name__)
        raise ConfigError(f"{name}={raw!r}: expected {expected}") from None
    if value is None:  # an automatic default
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name}={raw!r}: expected a finite number")
    if lo is not None and value < lo:
        raise ConfigError(f"{name}={value}: expected a value >= {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name}={value}: expected a value <= {hi}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


EMBEDDED_SAMPLE_DIR = "./data/datasets/embedded_pydoc_byte260"
# SMOKE=1 changes these defaults (environment values still win): a small model on the embedded sample, ~3 min on CPU.
SMOKE_DEFAULTS = dict(
    DATA_PATH=EMBEDDED_SAMPLE_DIR, TOKENIZER_PATH=f"{EMBEDDED_SAMPLE_DIR}/tokenizer.json", MODEL_DIM=128,
    NUM_HEADS=4, NUM_KV_HEADS=2, NUM_LAYERS=2, DECODER_LAYERS=2, LATENT_DIM=64, TRAIN_SEQ_LEN=511,
    TRAIN_BATCH_TOKENS=8176, VAL_BATCH_SIZE=32704, ITERATIONS=200, WARMDOWN_ITERS=60, WARMUP_STEPS=2,
    MUON_MOMENTUM_WARMUP_STEPS=50, MAX_WALLCLOCK_SECONDS=0.0, TRAIN_LOG_EVERY=25, EMA_DECAY=0.98,
    TTT_CHUNK_TOKENS=8192, TTT_BATCH_SEQS=8, TTT_LOG_EVERY=4, GPTQ_RESERVE_SECONDS=0.0)


class Hyperparameters:
    def __init__(self):
        self.smoke = env("SMOKE", False)  # embedded sample + small model, for a laptop or CI
        d = SMOKE_DEFAULTS if self.smoke else {}

        def knob(name, default, *a, **k):
            return env(name, d.get(name, default), *a, **k)
        self.data_path = knob("DATA_PATH", "./data/datasets/fineweb10B_byte260", str)
        self.tokenizer_path = knob("TOKENIZER_PATH", "./data/tokenizers/fineweb_pure_byte_260.json", str)
        self.run_id = knob("RUN_ID", str(uuid.uuid4()), str)
        self.seed = knob("SEED", 1337, lo=0, hi=2**62)
        self.eval_only = knob("EVAL_ONLY", "", str)  # path of a saved artifact: skip training, evaluate it
        self.device = knob("DEVICE", "auto", str, choices=("auto", "cuda", "cpu"))  # auto: CUDA or an error (not SMOKE)
        self.world_size = env("WORLD_SIZE", 1, lo=1)  # set by torchrun
        # a rank waiting longer at a collective ends the run: above the longest honest wait (rank 0 exporting alone)
        self.collective_timeout_seconds = knob("COLLECTIVE_TIMEOUT_SECONDS", 300.0, lo=1.0)  # torch's: 10-30 min
        self.vocab_size = knob("VOCAB_SIZE", 260, lo=1)
        self.patch_size = knob("PATCH_SIZE", 8, lo=1)
        # where patches end: every PATCH_SIZE bytes, or where words start (SpaceByte's rule, see patch_layout)
        self.patching = knob("PATCHING", "fixed", str, choices=("fixed", "space"))
        self.patch_max = knob("PATCH_MAX", self.patch_size, lo=1)  # space: longest patch (fixed: PATCH_SIZE)
        self.model_dim = knob("MODEL_DIM", 480, lo=2)
        self.num_heads = knob("NUM_HEADS", 6, lo=1)  # encoder query heads
        self.num_kv_heads = knob("NUM_KV_HEADS", 3, lo=1)  # encoder key/value heads (GQA)
        self.num_layers = knob("NUM_LAYERS", 5, lo=1)  # unique encoder blocks
        self.encoder_repeats = knob("ENCODER_REPEATS", 2, lo=1)  # depth recurrence: each block applied this often
        self.decoder_layers = knob("DECODER_LAYERS", 7, lo=1)
        self.decoder_heads = knob("DECODER_HEADS", 4, lo=1)
        self.decoder_dim = knob("DECODER_DIM", None, int, lo=2) or self.model_dim  # byte decoder width; auto: MODEL_DIM
        self.decoder_window = knob("DECODER_WINDOW", 128, lo=0)  # bytes a decoder position sees; 0: all (reference)
        self.latent_dim = knob("LATENT_DIM", 192, lo=1)  # JEPA latent, also the decoder's conditioning
        self.latent_per_slot = knob("LATENT_PER_SLOT", True)  # one latent projection per byte slot (MegaByte)
        self.latent_inject_layers = min(knob("LATENT_INJECT_LAYERS", 2, lo=1),  # decoder blocks fed the latent; 1:
                                        self.decoder_layers)  # input only (reference); at most DECODER_LAYERS
        self.latent_norm = knob("LATENT_NORM", True)  # RMS-normed latent, zero-init projections (H-Net)
        self.ngram_buckets = knob("NGRAM_BUCKETS", 4096, lo=0)  # hashed 2-4-gram rows, patch and decoder; 0: off
        self.ngram_dim = knob("NGRAM_DIM", None, int, lo=1) or max(self.model_dim // 4, 1)  # their width (BLT)
        self.smear_gate = knob("SMEAR_GATE", True)  # decoder input mixes in the previous position's, gated
        self.mlp_mult = knob("MLP_MULT", 2, lo=1)  # MLP and JEPA-head hidden width, in multiples of MODEL_DIM
        self.rope_base = knob("ROPE_BASE", 10000.0, lo=1.0)
        self.qk_gain_init = knob("QK_GAIN_INIT", 1.5)  # token records 4-5
        self.logit_softcap = knob("LOGIT_SOFTCAP", 30.0, lo=0.0)  # logits c*tanh(logits/c); 0 = off (reference)
        self.sigreg_slices = knob("SIGREG_SLICES", 256, lo=1)  # random 1-D projections per step
        self.ce_weight = knob("CE_WEIGHT", 3.0, lo=0.0)
        self.jepa_weight = knob("JEPA_WEIGHT", 0.0, lo=0.0)  # reference 0.5
        self.sigreg_weight = knob("SIGREG_WEIGHT", 0.02, lo=0.0)
        self.train_seq_len = knob("TRAIN_SEQ_LEN", 2047, lo=1)  # targets per window; the window is one byte longer
        # encoder positions per window; auto: window/PATCH_SIZE (fixed); space: one per 4.5 bytes, a multiple of 8
        # (patches average 5.3 bytes on the proxies' text at PATCH_MAX=8; 0-0.007% of their bytes ran out of slots)
        self.patch_slots = knob("PATCH_SLOTS", None, int, lo=1) or (
            self.window // self.patch_size if self.patching == "fixed" else -(-self.window // 36) * 8)
        per_step = 8 * self.train_seq_len  # batch defaults: rounded down to whole windows; set values are checked

        def whole_windows(name, default):
            return env(name, max(per_step, d.get(name, default) // per_step * per_step), lo=1)
        self.train_batch_tokens = whole_windows("TRAIN_BATCH_TOKENS", 524_032)  # targets per optimizer step
        self.iterations = knob("ITERATIONS", 20_000, lo=0)
        self.warmup_steps = knob("WARMUP_STEPS", 20, lo=0)  # compile/prime steps, then weights and state restored
        self.warmdown_iters = knob("WARMDOWN_ITERS", 3500, lo=0)  # linear LR decay over this many steps' worth
        # with a cap: the warmdown's share of the training time (token records 0.72); auto: WARMDOWN_ITERS (reference)
        self.warmdown_frac = knob("WARMDOWN_FRAC", 0.72, float, lo=0.0, hi=1.0, auto=True)
        self.lr_floor = knob("LR_FLOOR", 0.1, lo=0.0, hi=1.0)  # LR at the warmdown's end, x its base; reference 0
        self.max_wallclock_seconds = knob("MAX_WALLCLOCK_SECONDS", 600.0, lo=0.0)  # 0 = no cap
        self.train_log_every = knob("TRAIN_LOG_EVERY", 200, lo=1)
        self.val_loss_every = knob("VAL_LOSS_EVERY", 0, lo=0)  # 0 = validate at the last step only
        self.val_batch_size = whole_windows("VAL_BATCH_SIZE", 524_032)  # eval targets per 8 forwards (world x accum)
        self.use_compile = knob("USE_COMPILE", True)  # torch.compile on CUDA (ignored on CPU)
        self.matrix_lr = knob("MATRIX_LR", 0.025, lo=0.0)  # Muon
        self.embed_lr = knob("EMBED_LR", 0.1, lo=0.0)  # Adam: byte embeddings, patch slot positions
        self.head_lr = knob("HEAD_LR", 0.02, lo=0.0)  # Adam: output head
        self.scalar_lr = knob("SCALAR_LR", 0.025, lo=0.0)  # Adam: scales, mixes, gains, start latent
        self.muon_momentum = knob("MUON_MOMENTUM", 0.85, lo=0.0, hi=1.0)  # reference 0.99; records 0.97; rich proxy
        self.muon_momentum_warmup_start = knob("MUON_MOMENTUM_WARMUP_START", 0.92, lo=0.0, hi=1.0)
        self.muon_momentum_warmup_steps = knob("MUON_MOMENTUM_WARMUP_STEPS", 1500, lo=0)
        self.muon_backend_steps = knob("MUON_BACKEND_STEPS", 5, lo=1)
        self.muon_row_norm = knob("MUON_ROW_NORM", True)  # MuonEq-R: rows at unit norm before Newton-Schulz
        self.weight_decay = knob("WEIGHT_DECAY", 0.0, lo=0.0)  # decoupled, not on scalars; reference 0, records 0.04
        self.beta1 = knob("BETA1", 0.9, lo=0.0, hi=1.0)
        self.beta2 = knob("BETA2", 0.95, lo=0.0, hi=1.0)
        self.adam_eps = knob("ADAM_EPS", 1e-8, lo=0.0)
        self.weight_avg = knob("WEIGHT_AVG", "ema", str, choices=("ema", "swa", "none"))
        self.ema_decay = knob("EMA_DECAY", 0.997, lo=0.0, hi=1.0)  # token records 0.9965
        self.swa_every = knob("SWA_EVERY", 50, lo=1)
        self.swa_start_scale = knob("SWA_START_SCALE", 0.2, lo=0.0, hi=1.0)
        self.late_qat_threshold = knob("LATE_QAT_THRESHOLD", 0.0, lo=0.0, hi=1.0)  # reference 0.15
        self.quant = knob("QUANT", "gptq", str, choices=("rtn", "gptq"))
        self.gptq_calib_batches = knob("GPTQ_CALIB_BATCHES", 8, lo=1)  # training micro-batches per rank
        self.gptq_reserve_seconds = knob("GPTQ_RESERVE_SECONDS", None, float, lo=0.0)  # cut from training; auto: timed
        self.size_cap_bytes = knob("SIZE_CAP_BYTES", SIZE_CAP_BYTES, lo=1)  # code + artifact limit (tests lower it)
        self.prequant_eval = knob("PREQUANT_EVAL", True)  # standard eval of the averaged weights (diagnostic)
        self.roundtrip_eval = knob("ROUNDTRIP_EVAL", True)  # standard eval of the artifact's weights
        self.sliding_eval = knob("SLIDING_EVAL", False)  # sliding-window eval of the artifact without TTT
        self.val_sliding_stride = knob("VAL_SLIDING_STRIDE", self.patch_size * max(1, min(  # whole patches: 256
            256, self.train_seq_len) // self.patch_size), lo=1)  # bytes, or the window's, whichever is fewer
        self.ttt_enabled = knob("TTT_ENABLED", True)
        self.ttt_lr = knob("TTT_LR", 0.002, lo=0.0)
        self.ttt_epochs = knob("TTT_EPOCHS", 2, lo=0)
        self.ttt_chunk_tokens = knob("TTT_CHUNK_TOKENS", max(1, 32_768 // self.window) * self.window, lo=1)  # windows
        self.ttt_momentum = knob("TTT_MOMENTUM", 0.9, lo=0.0, hi=1.0)
        self.ttt_batch_seqs = knob("TTT_BATCH_SEQS", 32, lo=1)  # adaptation sequences per step, all ranks
        self.ttt_grad_clip = knob("TTT_GRAD_CLIP", 1.0, lo=0.0)  # 0 = no clipping
        self.ttt_freeze_blocks = knob("TTT_FREEZE_BLOCKS", 0, lo=0)  # leading encoder blocks kept fixed in TTT
        self.ttt_log_every = knob("TTT_LOG_EVERY", 50, lo=1)
        self.eval_breakdown = knob("EVAL_BREAKDOWN", True)  # final evaluations log bits by slot, class, position
        self.eval_max_seconds = knob("EVAL_MAX_SECONDS", 560.0, lo=0.0)  # 600 s - 40 (start, decoding, estimate error)
        self.preflight = knob("PREFLIGHT", False)  # GO/NO-GO before a paid run: the run for 30 steps, 3 TTT chunks
        self.check()

    @property
    def window(self) -> int:
        return self.train_seq_len + 1

    @property
    def grad_accum_steps(self) -> int:
        return 8 // self.world_size

    def check(self):
        """Combinations that cannot work; files are checked by `check_inputs`."""
        if 8 % self.world_size:
            raise ConfigError(f"WORLD_SIZE={self.world_size}: expected a divisor of 8 (1, 2, 4 or 8 processes)")
        if self.patching == "fixed" and self.window % self.patch_size:
            raise ConfigError(f"TRAIN_SEQ_LEN={self.train_seq_len}, PATCH_SIZE={self.patch_size}: "
                              f"TRAIN_SEQ_LEN+1 must be a multiple of PATCH_SIZE")
        fixed_slots = self.window // self.patch_size
        if self.patching == "fixed" and (self.patch_max, self.patch_slots) != (self.patch_size, fixed_slots):
            raise ConfigError(f"PATCH_MAX={self.patch_max}, PATCH_SLOTS={self.patch_slots}: they apply to PATCHING="
                              f"space (fixed patches: PATCH_SIZE={self.patch_size} bytes, {fixed_slots} to a window)")
        if not -(-self.window // self.patch_max) <= self.patch_slots <= self.window:
            raise ConfigError(f"PATCH_SLOTS={self.patch_slots}: expected between the window's patches at PATCH_MAX="
                              f"{self.patch_max} ({-(-self.window // self.patch_max)}) and its bytes ({self.window})")
        per_step = 8 * self.train_seq_len  # world_size x grad_accum_steps x sequence
        for name, value in (("TRAIN_BATCH_TOKENS", self.train_batch_tokens), ("VAL_BATCH_SIZE", self.val_batch_size)):
            if value % per_step:
                raise ConfigError(f"{name}={value}: expected a multiple of world_size x grad_accum_steps x "
                                  f"TRAIN_SEQ_LEN = {self.world_size} x {self.grad_accum_steps} x "
                                  f"{self.train_seq_len} = {per_step}")
        for dim, width, heads, kv, label in (
                ("MODEL_DIM", self.model_dim, self.num_heads, self.num_kv_heads, "NUM_HEADS"),
                ("DECODER_DIM", self.decoder_dim, self.decoder_heads, self.decoder_heads, "DECODER_HEADS")):
            if width % heads or (width // heads) % 2:
                raise ConfigError(f"{dim}={width}, {label}={heads}: expected heads dividing {dim} into an "
                                  f"even head size (rotary embeddings rotate pairs)")
            if heads % kv:
                raise ConfigError(f"NUM_HEADS={heads}, NUM_KV_HEADS={kv}: expected NUM_KV_HEADS dividing NUM_HEADS")
        if self.sliding_eval or self.ttt_enabled:  # knobs of evaluations that will not run are not held against a run
            if self.val_sliding_stride % self.patch_size or self.val_sliding_stride > self.train_seq_len:
                raise ConfigError(f"VAL_SLIDING_STRIDE={self.val_sliding_stride}: expected a multiple of PATCH_SIZE="
                                  f"{self.patch_size} no larger than TRAIN_SEQ_LEN={self.train_seq_len}")
            if self.ttt_chunk_tokens % self.window:
                raise ConfigError(f"TTT_CHUNK_TOKENS={self.ttt_chunk_tokens}: expected a multiple of the window "
                                  f"TRAIN_SEQ_LEN+1={self.window}")
        if self.preflight and self.eval_only:
            raise ConfigError(f"PREFLIGHT=1, EVAL_ONLY={self.eval_only}: a preflight checks a training run; unset one")
        if self.ttt_freeze_blocks > self.num_layers:
            raise ConfigError(f"TTT_FREEZE_BLOCKS={self.ttt_freeze_blocks}: expected <= NUM_LAYERS={self.num_layers}")
        cap, reserve = self.max_wallclock_seconds, self.gptq_reserve_seconds
        if self.quant == "gptq" and cap > 0 and reserve is not None and reserve >= cap:
            raise ConfigError(f"GPTQ_RESERVE_SECONDS={reserve}, MAX_WALLCLOCK_SECONDS={cap}: reserve must be shorter")

    def training_cap_seconds(self, reserve: float | None = None) -> float:
        """Training seconds (0 = no cap): the cap less GPTQ calibration's `reserve` (else GPTQ_RESERVE_SECONDS or 0)."""
        cap = self.max_wallclock_seconds
        if cap <= 0 or self.quant != "gptq":
            return cap if cap > 0 else 0.0
        return max(cap - ((self.gptq_reserve_seconds or 0.0) if reserve is None else reserve), 1e-3)


# ---- Data: the official byte260 shard format, a deterministic streaming loader, the embedded sample -------------

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
BOS_ID, BYTE_OFFSET = 1, 4  # ids 0-3 are pad, BOS, EOS, unk; byte b is id b+4
PURE_BYTE_TOKENIZER = {"tokenizer_type": "pure_byte", "vocab_size": 260, "config": {  # the official exporter's
    "pad_id": 0, "bos_id": BOS_ID, "eos_id": 2, "unk_id": 3, "byte_offset": BYTE_OFFSET, "byte_count": 256}}


def encode_document(text: str) -> np.ndarray:
    """One document as the official exporter writes it: BOS, then its UTF-8 bytes shifted by 4 (no EOS)."""
    body = np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.uint16) + BYTE_OFFSET
    return np.concatenate((np.array([BOS_ID], dtype=np.uint16), body))


def write_atomically(path: str | Path, data: bytes) -> None:
    """All of `data` or the file as it was, never torn: a temporary file beside it, fsynced, renamed over it."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    write_atomically(path, header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


def read_shard_header(path: Path) -> int:
    if not path.is_file():
        raise ConfigError(f"{path}: shard file not found")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)  # fewer ints if the file is shorter
    if header.size != HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ConfigError(f"{path}: not a byte260 shard (expected magic {SHARD_MAGIC} and version {SHARD_VERSION} "
                          f"in a {HEADER_INTS * 4}-byte header)")
    count, size = int(header[2]), path.stat().st_size
    if count < 0 or size != HEADER_INTS * 4 + 2 * count:
        raise ConfigError(f"{path}: file is {size} bytes but its header promises {count} tokens "
                          f"({HEADER_INTS * 4 + 2 * count} bytes); the shard is truncated or corrupt")
    return count


def load_data_shard(path: str | Path, vocab_size: int = 260) -> np.ndarray:
    path = Path(path)
    count = read_shard_header(path)
    tokens = np.fromfile(path, dtype="<u2", count=count, offset=HEADER_INTS * 4)
    if count and int(tokens.max()) >= vocab_size:
        raise ConfigError(f"{path}: token id {int(tokens.max())} is outside the vocabulary (VOCAB_SIZE={vocab_size})")
    return tokens


def shard_paths(data_path: str, split: str) -> list[Path]:
    return sorted(Path(data_path).glob(f"fineweb_{split}_*.bin"))


def check_inputs(args: Hyperparameters) -> None:
    """Every file the run will need, checked before any process group or model exists."""
    if args.eval_only:
        read_artifact(args.eval_only)  # a missing, damaged or foreign file stops the run here, with one line
    if args.smoke and Path(args.data_path) == Path(EMBEDDED_SAMPLE_DIR):
        build_embedded_sample(Path(args.data_path))
    if args.vocab_size != PURE_BYTE_TOKENIZER["vocab_size"]:
        raise ConfigError(f"VOCAB_SIZE={args.vocab_size}: this model reads the pure-byte vocabulary of 260 ids")
    tokens = {}
    for split in ("val",) if args.eval_only else ("train", "val"):
        paths = shard_paths(args.data_path, split)
        if not paths:
            raise ConfigError(f"DATA_PATH={args.data_path}: no fineweb_{split}_*.bin shards. Prepare FineWeb with "
                              f"`python3 data/prepare.py`, or run SMOKE=1 for the embedded sample")
        tokens[split] = sum(read_shard_header(p) for p in paths)
    tok = Path(args.tokenizer_path)
    try:
        meta = json.loads(tok.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"TOKENIZER_PATH={tok}: cannot read a JSON tokenizer description ({e}); "
                          f"`python3 data/prepare.py` writes it beside the shards") from None
    meta = meta if isinstance(meta, dict) else {}
    if meta.get("tokenizer_type") != "pure_byte" or meta.get("vocab_size") != args.vocab_size:
        raise ConfigError(f"TOKENIZER_PATH={tok}: expected tokenizer_type 'pure_byte' with vocab_size "
                          f"{args.vocab_size}, found {meta.get('tokenizer_type')!r} with {meta.get('vocab_size')!r}")
    if tokens.get("train", 1) == 0:
        raise ConfigError(f"DATA_PATH={args.data_path}: the training split (fineweb_train_*.bin) holds no tokens")
    if tokens["val"] <= args.train_seq_len:
        raise ConfigError(f"DATA_PATH={args.data_path}: the validation split has {tokens['val'] - 1} targets, fewer "
                          f"than one window (TRAIN_SEQ_LEN={args.train_seq_len})")


def load_validation_tokens(args: Hyperparameters) -> np.ndarray:
    return np.concatenate([load_data_shard(p, args.vocab_size) for p in shard_paths(args.data_path, "val")])


class TokenStream:
    """Training shards in order, cycling; a background thread reads (and checks) the next while this one is consumed."""

    def __init__(self, paths: list[Path], vocab_size: int):
        self.paths, self.vocab_size, self.next_index, self.pos = paths, vocab_size, 1 % len(paths), 0
        self.reader = ThreadPoolExecutor(max_workers=1)
        self.tokens = load_data_shard(paths[0], vocab_size)
        self.upcoming = self.reader.submit(load_data_shard, paths[self.next_index], vocab_size)

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos == len(self.tokens):
                self.tokens, self.pos = self.upcoming.result(), 0  # a bad shard raises here, when reached
                self.next_index = (self.next_index + 1) % len(self.paths)
                self.upcoming = self.reader.submit(load_data_shard, self.paths[self.next_index], self.vocab_size)
            k = min(n, len(self.tokens) - self.pos)
            parts.append(self.tokens[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        return np.concatenate(parts)


class DistributedTokenLoader:
    """Rank r takes the r-th of W contiguous spans per micro-step: a batch is the same bytes on 1 or 8 processes."""

    def __init__(self, args: Hyperparameters, rank: int, device: torch.device):
        self.stream = TokenStream(shard_paths(args.data_path, "train"), args.vocab_size)
        self.rank, self.world, self.device, self.seq = rank, args.world_size, device, args.train_seq_len
        self.seqs = args.train_batch_tokens // (8 * self.seq)  # per rank and micro-step

    def next_batch(self) -> Tensor:
        span = self.seqs * self.seq + 1
        local = self.stream.take(span * self.world)[self.rank * span:(self.rank + 1) * span].astype(np.int64)
        windows = torch.from_numpy(local).unfold(0, self.seq + 1, self.seq)
        return to_device(windows.contiguous(), self.device)  # one stride for every batch: no recompilation


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host -> device copy that does not stall the host (pinned memory) on CUDA."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def build_embedded_sample(out_dir: Path, num_val_docs: int = 8) -> None:
    """The sample every Python carries: pydoc's topic texts (~465 KB) as byte260 shards, built once and cached."""
    if (out_dir / "tokenizer.json").is_file():
        return
    from pydoc_data.topics import topics  # the standard library's help texts
    docs = [encode_document(topics[k]) for k in sorted(topics)]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_shard(out_dir / "fineweb_val_000000.bin", np.concatenate(docs[:num_val_docs]))
    write_shard(out_dir / "fineweb_train_000000.bin", np.concatenate(docs[num_val_docs:]))
    description = json.dumps(PURE_BYTE_TOKENIZER, indent=2, sort_keys=True) + "\n"
    write_atomically(out_dir / "tokenizer.json", description.encode())


# ---- Model: patch embedding -> recurrent patch encoder -> JEPA heads -> causal byte decoder ---------------------

CONTROL_TENSOR_NAMES = ("attn_scale", "mlp_scale", "resid_mix", "q_gain")  # kept in fp32 in the artifact
TRAINING_ONLY_PREFIXES = ("projector.",)  # used by the JEPA loss only: not stored in the artifact


def fake_quantize_int6(w: Tensor) -> Tensor:
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 31.0
    return torch.clamp(torch.round(w / scale), -31, 31) * scale


class CastedLinear(nn.Linear):
    """fp32 weight used in the activations' dtype; with `qat`, training sees it int6-rounded, straight-through."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.qat = False
        if zero_init:  # residual branches start as the identity
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        w = w + (fake_quantize_int6(w) - w).detach() if self.qat and self.training else w
        return F.linear(x, w.to(x.dtype))


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=1e-6)  # explicit: the default follows the dtype (bf16: 8e-3)


def apply_rotary(x: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotary embedding of (B, H, T, D), tables per call: a cache would outlive the inference-mode eval filling it."""
    angles = torch.outer(torch.arange(x.size(-2), device=x.device, dtype=inv_freq.dtype), inv_freq)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def flex_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Sliding-window causal attention, compiled (eager FlexAttention is dense; in a compiled graph, with it): cost T x
    window. Head sizes zero-padded to a power of two (older FlexAttention takes no other), one dtype (no autocast)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    T, D, inside = q.size(-2), q.size(-1), torch.compiler.is_compiling()  # inside: no torch.compile nested
    mask = create_block_mask(lambda b, h, i, j: (j <= i) & (i - j < window), None, None, T, T, device=q.device,
                             _compile=not inside)  # eager, a dense T x T mask unless compiled (GPTQ calibration)
    q, k, v = (F.pad(t.to(v.dtype), (0, (1 << (D - 1).bit_length()) - D)) for t in (q, k, v))
    return (flex_attention if inside else compiled_flex_attention())(q, k, v, block_mask=mask, scale=D ** -0.5)[..., :D]


@functools.cache
def compiled_flex_attention():
    """Imported and compiled at the first call: FlexAttention loads the compiler stack (seconds on every CPU start)."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


def local_causal_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Exact causal attention of (B, H, T, D), query i seeing keys i-window+1..i: FlexAttention on CUDA; elsewhere
    each block of `window` queries attends to its own and the previous block's keys, masked (also T x window).
    Keys and values may have fewer heads (GQA: query head h reads key head h // (H / H_kv))."""
    B, H, T, D = q.shape
    if window >= T:  # GQA in the kernel: keys and values are not copied per query head
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    k, v = (t.repeat_interleave(H // t.size(1), dim=1) if t.size(1) < H else t for t in (k, v))  # windowed: H_kv = H
    if q.is_cuda:
        return flex_window_attention(q, k, v, window)
    n = -(-T // window)
    q, k, v = (F.pad(t, (0, 0, 0, n * window - T)).view(B, H, n, window, D) for t in (q, k, v))
    k, v = (torch.cat((F.pad(t, (0, 0, 0, 0, 1, 0))[:, :, :-1], t), dim=3) for t in (k, v))  # previous block first
    i = torch.arange(window, device=q.device)[:, None] + window  # query positions within the 2-block span
    j = torch.arange(2 * window, device=q.device)
    visible = (j <= i) & (i - j < window) & ((torch.arange(n, device=q.device) > 0)[:, None, None] | (j >= window))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible).view(B, H, n * window, D)[:, :, :T]


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, rope_base: float, qk_gain_init: float, window: int = 0):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.window = heads, kv_heads, dim // heads, window
        self.q = CastedLinear(dim, dim)
        self.k = CastedLinear(dim, kv_heads * self.head_dim)
        self.v = CastedLinear(dim, kv_heads * self.head_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((heads,), qk_gain_init))
        inv_freq = 1.0 / rope_base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        # normalised q and k keep attention logits bounded; the learned per-head gain sets their temperature
        q = apply_rotary(rms_norm(q), self.inv_freq) * self.q_gain.to(q.dtype)[None, :, None, None]
        k = apply_rotary(rms_norm(k), self.inv_freq)
        return self.proj(local_causal_attention(q, k, v, self.window or T).transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.fc = CastedLinear(dim, mult * dim)
        self.proj = CastedLinear(mult * dim, dim, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(x), 0.5).square())


class Block(nn.Module):
    """Pre-norm block with learned per-channel branch scales and a learned mix of the stream with the stack's input."""

    def __init__(self, dim: int, heads: int, kv_heads: int, mlp_mult: int, rope_base: float, qk_gain_init: float,
                 window: int = 0):
        super().__init__()
        self.attn = CausalSelfAttention(dim, heads, kv_heads, rope_base, qk_gain_init, window)
        self.mlp = MLP(dim, mlp_mult)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x))
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x))


class LatentHead(nn.Module):
    """RMSNorm -> Linear -> SiLU -> Linear: the JEPA projector (patch -> its latent) and predictor (-> the next's)."""

    def __init__(self, dim: int, hidden: int, latent: int):
        super().__init__()
        self.fc = CastedLinear(dim, hidden)
        self.out = CastedLinear(hidden, latent)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.silu(self.fc(rms_norm(x))))


def ngram_buckets(ids: Tensor, buckets: int) -> Tensor:
    """(B, L) bytes -> (B, L, 3): hash buckets of the 2-, 3- and 4-gram ending at each byte (BOS before the window)."""
    h, out = ids.long(), []
    for n in range(2, 5):
        h = (h * 1_000_003 + F.pad(ids[:, :1 - n], (n - 1, 0), value=BOS_ID)) % 2_147_483_647
        out.append((h + n * 7_919) % buckets)
    return torch.stack(out, dim=-1)


class HashedNgrams(nn.Module):
    """BLT's hashed byte n-gram embeddings, summed, projected from zero: switched on, the model starts as without."""

    def __init__(self, buckets: int, width: int, dim: int):
        super().__init__()
        self.table = nn.Embedding(buckets, width)
        self.proj = CastedLinear(width, dim, zero_init=True)

    def forward(self, ids: Tensor) -> Tensor:
        return self.proj(self.table(ngram_buckets(ids, self.table.num_embeddings)).sum(-2))


class SmearGate(nn.Module):
    """x_i + g_i x_{i-1} (modded-nanogpt), gate closed at first and shut at BOS (no document reads its predecessor)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.mix = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        gate = self.mix.to(x.dtype) * torch.sigmoid(x @ self.weight.to(x.dtype)) * (ids != BOS_ID)
        return x + gate[..., None] * F.pad(x[:, :-1], (0, 0, 1, 0))


def sigreg(z: Tensor, directions: Tensor, weight: Tensor | None = None, knots: int = 17, t_max: float = 3.0) -> Tensor:
    """Sketched isotropic-Gaussian regulariser: per projection of z (N, D) on unit directions (D, S), the Gaussian-
    windowed squared distance of the empirical characteristic function from N(0, 1)'s over [0, t_max] (even in t):
    zero only for N(0, 1) marginals (no collapse, no scale drift). fp32: phases t*x need it. `weight`: 0 for padding."""
    with torch.autocast("cuda", enabled=False):  # the only autocast this script enables
        proj = z.float() @ directions
        t = torch.linspace(0.0, t_max, knots, device=z.device)
        phase = proj.unsqueeze(-1) * t
        normal_cf = torch.exp(-0.5 * t.square())
        w = None if weight is None else weight.reshape(-1, 1, 1) / weight.sum()
        mean = (lambda v: v.mean(0)) if w is None else (lambda v: (v * w).sum(0))
        err = (mean(phase.cos()) - normal_cf).square() + mean(phase.sin()).square()
        trapezoid = torch.full_like(t, t_max / (knots - 1))
        trapezoid[0] = trapezoid[-1] = trapezoid[0] / 2
        return (err * normal_cf * trapezoid).sum(-1).mean()


def sigreg_directions(dim: int, slices: int, seed: int, device: torch.device) -> Tensor:
    """Unit directions redrawn every step from a seed all ranks share, drawn on the device (no host sync)."""
    d = torch.randn(dim, slices, generator=torch.Generator(device=device).manual_seed(seed), device=device)
    return d / d.norm(dim=0, keepdim=True)


def spacelike(ids: Tensor) -> Tensor:
    """SpaceByte's spacelike bytes: neither an ASCII letter or digit nor a UTF-8 continuation byte (BOS is one)."""
    b = ids - BYTE_OFFSET
    return ~(((b >= 48) & (b <= 57)) | ((b >= 65) & (b <= 90)) | ((b >= 97) & (b <= 122)) | ((b >= 128) & (b < 192)))


def patch_layout(ids: Tensor, patching: str, P: int, slots: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L) window -> each byte's patch (< PATCH_SLOTS) and slot in it (< PATCH_MAX), patched from the window's
    first byte, and the first byte of each window's capped tail (L: none). fixed: every PATCH_SIZE bytes. space: a
    patch starts at byte i when byte i-1 is spacelike and byte i-2 is not, when byte i-1 is BOS, or when the patch
    holds PATCH_MAX bytes: byte i's patch depends on bytes < i only. Budget: from the first byte at which the patches
    so far plus PATCH_MAX-byte ones for the rest would exceed PATCH_SLOTS, the window's tail is cut into PATCH_MAX-byte
    patches; no byte is dropped, and that rule too reads only bytes < i. Data-dependent values, static shapes."""
    B, L = ids.shape
    pos = torch.arange(L, device=ids.device)
    if patching == "fixed":
        return (pos // P).expand(B, L), (pos % P).expand(B, L), torch.full((B, 1), L, device=ids.device)
    space = spacelike(ids)
    start = ((F.pad(space[:, :-1], (1, 0), value=True) & ~F.pad(space[:, :-2], (2, 0), value=True))
             | F.pad(ids[:, :-1] == BOS_ID, (1, 0), value=True))  # byte 0 starts the window's first patch
    start |= (pos - torch.where(start, pos, 0).cummax(dim=1).values) % P == 0
    over = start.cumsum(dim=1) + (L - 2 - pos + P) // P > slots  # patches through i + ceil((L-1-i)/P)
    tail = torch.where(over, pos, L).amin(dim=1, keepdim=True)
    start = torch.where(pos >= tail, (pos - tail) % P == 0, start)
    return start.cumsum(dim=1) - 1, pos - torch.where(start, pos, 0).cummax(dim=1).values, tail


class ByteJEPA(nn.Module):
    def __init__(self, args: Hyperparameters):
        super().__init__()
        d, V, P, L, dd = args.model_dim, args.vocab_size, args.patch_max, args.latent_dim, args.decoder_dim
        self.patching, self.patch_max, self.slots = args.patching, P, args.patch_slots
        self.latent_norm, self.latent_per_slot = args.latent_norm, args.latent_per_slot
        cond = P * dd if args.latent_per_slot else dd  # per patch: one vector per byte slot, or one for all
        self.byte_emb = nn.Embedding(V, d)
        self.slot_pos = nn.Parameter(torch.randn(P, d) * 0.02)
        self.patch_proj = CastedLinear(P * d, d)
        self.blocks = nn.ModuleList(Block(d, args.num_heads, args.num_kv_heads, args.mlp_mult, args.rope_base,
                                          args.qk_gain_init) for _ in range(args.num_layers))
        self.encoder_repeats = args.encoder_repeats
        self.projector = LatentHead(d, args.mlp_mult * d, L)
        self.predictor = LatentHead(d, args.mlp_mult * d, L)
        self.start_latent = nn.Parameter(torch.zeros(L))
        self.dec_emb = nn.Embedding(V, dd)
        self.latent_in = CastedLinear(L, cond, zero_init=args.latent_norm)
        self.dec_blocks = nn.ModuleList(Block(dd, args.decoder_heads, args.decoder_heads, args.mlp_mult, args.rope_base,
                                              args.qk_gain_init, args.decoder_window)
                                        for _ in range(args.decoder_layers))
        self.head = CastedLinear(dd, V, zero_init=True)
        # created last, and only when on, so that their "off" values leave every other initial weight as it was
        self.latent_inject = nn.ModuleList(CastedLinear(L, cond, zero_init=True)
                                           for _ in range(args.latent_inject_layers - 1))
        self.patch_ngrams = HashedNgrams(args.ngram_buckets, args.ngram_dim, d) if args.ngram_buckets else None
        self.dec_ngrams = HashedNgrams(args.ngram_buckets, args.ngram_dim, dd) if args.ngram_buckets else None
        self.smear = SmearGate(dd) if args.smear_gate else None
        self.softcap = args.logit_softcap

    def layout(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        return patch_layout(ids, self.patching, self.patch_max, self.slots)[:2]

    def to_slots(self, x: Tensor, patch: Tensor, slot: Tensor) -> Tensor:
        """(B, L, D) per byte -> (B, S, P, D): each byte at its patch's slot, zeros in slots no byte fills."""
        B, L, D = x.shape
        if self.patching == "fixed":
            return x.view(B, L // self.patch_max, self.patch_max, D)
        index = (patch * self.patch_max + slot)[..., None].expand(-1, -1, D)
        return x.new_zeros(B, self.slots * self.patch_max, D).scatter(1, index, x).view(B, self.slots, -1, D)

    def to_bytes(self, c: Tensor, patch: Tensor, slot: Tensor) -> Tensor:
        """(B, S, D) per patch -> per byte: its slot's part (B, L, D/P) (per-slot latents), or its patch's (B, L, D)."""
        B, D, P = c.size(0), c.size(-1), self.patch_max
        if self.patching == "fixed":
            return c.view(B, -1, D // P) if self.latent_per_slot else c.repeat_interleave(P, dim=1)
        if self.latent_per_slot:
            c, patch = c.view(B, -1, D // P), patch * P + slot
        return c.gather(1, patch[..., None].expand(-1, -1, c.size(-1)))

    def embed_patches(self, ids: Tensor, patch: Tensor, slot: Tensor) -> Tensor:
        """(B, L) bytes -> (B, S, d): slot byte (+ its n-grams) + slot position, normalised, concatenated, projected."""
        x = self.byte_emb(ids)
        x = x + self.patch_ngrams(ids) if self.patch_ngrams is not None else x
        return self.patch_proj(rms_norm(self.to_slots(x, patch, slot) + self.slot_pos).flatten(2))

    def encode(self, patches: Tensor) -> Tensor:
        """Causal encoder over patches; its output at patch p has seen bytes of patches <= p only."""
        x = patches
        for _ in range(self.encoder_repeats):
            for block in self.blocks:
                x = block(x, patches)
        return rms_norm(x)

    def conditioning(self, latents: Tensor, patch: Tensor, slot: Tensor) -> list[Tensor]:
        """(B, S, latent) -> one (B, L, dd) input per fed decoder block: computed once per patch, then
        expanded to its bytes (the same vector for each, or each slot's own part)."""
        latents = rms_norm(latents) if self.latent_norm else latents
        return [self.to_bytes(proj(latents), patch, slot) for proj in (self.latent_in, *self.latent_inject)]

    def decode(self, ids: Tensor, predicted: Tensor, patch: Tensor, slot: Tensor) -> Tensor:
        """Decoder states (B, L, dd). Byte i of patch p reads byte i-1 (BOS for i = 0) and the latent predicted
        from patches < p (the start latent for p = 0), so its state depends on bytes < i only."""
        start = self.start_latent.to(predicted.dtype).expand(ids.size(0), 1, -1)
        conds = self.conditioning(torch.cat((start, predicted[:, :-1]), dim=1), patch, slot)
        prev = F.pad(ids[:, :-1], (1, 0), value=BOS_ID)
        x = self.dec_emb(prev).to(conds[0].dtype) + conds[0]  # bf16 under autocast, like the encoder's stream
        x = x + self.dec_ngrams(prev) if self.dec_ngrams is not None else x
        x = self.smear(x, prev) if self.smear is not None else x
        x0 = x
        for i, block in enumerate(self.dec_blocks):
            x = block(x + conds[i] if 0 < i < len(conds) else x, x0)
        return rms_norm(x)

    def hidden_states(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The one forward path: patch embeddings, predicted next-patch latents, decoder states, byte patches."""
        patch, slot = self.layout(ids)
        patches = self.embed_patches(ids, patch, slot)
        predicted = self.predictor(self.encode(patches))
        return patches, predicted, self.decode(ids, predicted, patch, slot), patch

    def forward_logits(self, ids: Tensor) -> Tensor:
        """(B, L) ids (fixed: L a multiple of PATCH_SIZE) -> (B, L, V) float logits; position i predicts ids[:, i]."""
        return self.logits(self.hidden_states(ids)[2])

    def logits(self, h: Tensor) -> Tensor:
        z = self.head(h).float()
        return self.softcap * torch.tanh(z / self.softcap) if self.softcap else z

    def forward(self, ids: Tensor, directions: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Training terms on windows (B, L): mean byte CE over positions 1.. (position 0 is context only), and,
        given SIGReg directions, the JEPA prediction MSE and SIGReg of the targets (else zeros)."""
        patches, predicted, h, patch = self.hidden_states(ids)
        logits = self.logits(h[:, 1:])
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        if directions is None:
            return ce, ce.new_zeros(()), ce.new_zeros(())
        targets = self.projector(patches)
        if self.patching == "fixed":
            mse, real = F.mse_loss(predicted[:, :-1].float(), targets[:, 1:].detach().float()), None
        else:  # the padding patches after a window's last real one are neither targets nor predicted
            real = (torch.arange(self.slots, device=ids.device) <= patch[:, -1:]).float()
            err = (predicted[:, :-1].float() - targets[:, 1:].detach().float()).square().mean(-1)
            mse = (err * real[:, 1:]).sum() / real[:, 1:].sum()
        return ce, mse, sigreg(targets.reshape(-1, targets.size(-1)), directions, real)


def build_model(args: Hyperparameters) -> ByteJEPA:
    torch.manual_seed(args.seed)
    return ByteJEPA(args)


def flops_per_byte(args: Hyperparameters, training: bool) -> dict[str, float]:
    """Analytic matmul FLOPs per target byte by component (2 per multiply-add; norms, RoPE, softmax, losses left out),
    attention causal as the kernels compute it: query i meets min(i+1, window) keys. Training: 3x forward (dx and dW),
    SIGReg's fixed projection 2x; flash attention's backward recomputation is not counted (the MFU convention)."""
    d, P, L, T, m, dd = args.model_dim, args.patch_max, args.latent_dim, args.window, args.mlp_mult, args.decoder_dim
    patches, W = args.patch_slots, min(args.decoder_window or T, T)  # the encoder runs on every slot, padding too
    kv = args.num_kv_heads * (d // args.num_heads)
    causal_pairs = lambda n: n * (n + 1) / 2
    encoder_apps = args.num_layers * args.encoder_repeats
    head_hidden = 2 * (d * m * d + m * d * L)  # LatentHead: d -> m*d -> L
    conditioning = args.latent_inject_layers * 2 * L * dd * (patches * P if args.latent_per_slot else patches)
    f = dict(patch_embedding=2 * P * d * d * patches,
             encoder_blocks=encoder_apps * patches * 2 * (2 * d * d + 2 * d * kv + 2 * m * d * d),
             encoder_attention=encoder_apps * 4 * d * causal_pairs(patches),
             jepa_heads=patches * head_hidden,
             decoder_blocks=conditioning + args.decoder_layers * T * 2 * (4 * dd * dd + 2 * m * dd * dd),
             decoder_attention=args.decoder_layers * 4 * dd * (causal_pairs(W) + (T - W) * W),  # query i: min(i+1, W)
             output_head=2 * dd * args.vocab_size * (T - 1 if training else T))  # training scores positions 1..
    if args.ngram_buckets:
        f["ngram_embeddings"] = 2 * args.ngram_dim * (d + dd) * T
    if training:
        f = {k: 3 * v for k, v in f.items()}
        f["jepa_heads"] += 3 * patches * head_hidden + 2 * 2 * patches * L * args.sigreg_slices  # projector, SIGReg
    return {k: v / args.train_seq_len for k, v in f.items()}


# ---- Runtime and optimizers: process group, Muon (orthogonalisation shared across ranks), Adam groups -----------

def check_device(args: Hyperparameters) -> None:
    """CUDA unless asked otherwise: without this, a driver mismatch would silently train on 8 CPU processes."""
    if args.device == "cpu" or torch.cuda.is_available() or (args.device == "auto" and args.smoke):
        return
    why = f"CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda})"
    if args.device == "cuda":
        raise ConfigError(f"DEVICE=cuda: {why}; check the driver and that the installed torch is a CUDA build")
    raise ConfigError(f"DEVICE=auto: {why}; set DEVICE=cpu to train on the CPU on purpose, or SMOKE=1 (small run)")


class Stopped(RunError):
    """SIGTERM or SIGINT: `note`, the handler, only records it; the run ends where the ranks next meet (Runtime.meet),
    or at once where rank 0 works alone (`check`, in the export). Exit 128 + the signal's number."""
    signum = 0  # the first signal received (torchrun forwards one it gets, so a rank may see it twice)

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name, 128 + signum)

    @classmethod
    def note(cls, signum: int, frame) -> None:
        cls.signum = cls.signum or signum

    @classmethod
    def check(cls) -> None:
        if cls.signum:
            raise cls(cls.signum)


class CollectiveFailed(RunError):
    """This rank waited past COLLECTIVE_TIMEOUT_SECONDS (exit 7: maybe the only one that knows), or a peer had gone."""
    exit_code = 7


# torch 2.5's names for the single-tensor collectives, deprecated for these in later versions
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Runtime:
    """CUDA (NCCL, bf16 autocast) or CPU (gloo, float32). TF32 stays off: SIGReg's and GPTQ's matmuls must be exact."""

    def __init__(self, args: Hyperparameters):
        self.rank, self.world = int(os.environ.get("RANK", 0)), args.world_size
        self.master = self.rank == 0
        self.cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if self.cuda else torch.device("cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)
        self.host_group = None  # host-side collectives (the training clock) that must not wait on the GPU stream
        self.timeout = timedelta(seconds=args.collective_timeout_seconds)
        self.phase, self.artifact = "setup", None  # where the run is, the artifact once complete: for a last line
        if self.world > 1:
            dist.init_process_group("nccl" if self.cuda else "gloo", device_id=self.device if self.cuda else None,
                                    timeout=self.timeout)
            self.host_group = dist.new_group(backend="gloo", timeout=self.timeout) if self.cuda else None  # None: world
        self.compile = args.use_compile and self.cuda

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda)

    def all_reduce(self, t: Tensor, op=dist.ReduceOp.SUM, group=None) -> Tensor:
        return self.collective("all_reduce", dist.all_reduce, t, op=op, group=group) if self.world > 1 else t

    def all_gather(self, t: Tensor) -> Tensor:  # every rank's t, stacked in rank order along dim 0
        return (self.collective("all_gather", ALL_GATHER, t.new_empty(self.world * t.size(0), *t.shape[1:]), t)
                if self.world > 1 else t)  # one process: no buffer (Muon calls this every step)

    def reduce_scatter(self, t: Tensor) -> Tensor:  # rank r: the r-th of world parts of t (dim 0), summed over ranks
        return (self.collective("reduce_scatter", REDUCE_SCATTER, t.new_empty(t.size(0) // self.world, *t.shape[1:]), t)
                if self.world > 1 else t)

    def collective(self, name: str, fn, out: Tensor, *args, **kwargs) -> Tensor:
        """fn(out, *args, **kwargs) on every rank; a rank gone or a timeout ends this one with one line."""
        try:
            fn(out, *args, **kwargs)
        except RuntimeError as e:  # gloo raises here; NCCL's watchdog ends a timed-out process itself
            timed_out = "timed out" in str(e).lower()
            why = f"waited past COLLECTIVE_TIMEOUT_SECONDS={self.timeout.total_seconds():g}" if timed_out else \
                f"another rank has gone ({str(e).split('] ')[-1].split('. ')[0]})"  # gloo's first sentence
            raise CollectiveFailed(f"rank {self.rank}: {name} during {self.phase} failed: {why}",
                                   None if timed_out else 1) from None
        return out

    def meet(self, *values: float, phase: str | None = None) -> list[float]:
        """Every rank meets here (in `phase`, if given): values maxed over ranks on the host; a stop signal ends all."""
        self.phase = phase or self.phase
        both = torch.tensor([*values, float(Stopped.signum)], dtype=torch.float64)
        *values, signum = self.all_reduce(both, dist.ReduceOp.MAX, self.host_group).tolist()
        if signum:
            raise Stopped(int(signum))
        return values

    def now(self) -> float:
        """perf_counter once the work queued on the device is done (CUDA runs asynchronously to the host)."""
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def close(self):
        self.host_group = None  # a process group outliving destroy_process_group aborts the interpreter's exit
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_grads(params: list[Tensor], rt: Runtime) -> None:
    if rt.world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = rt.all_reduce(torch.cat([g.flatten() for g in grads]))
    for p, g, part in zip(params, grads, flat.split([g.numel() for g in grads])):
        p.grad = part.view_as(g)


def newton_schulz_orthogonalize(g: Tensor, steps: int) -> Tensor:
    """U V^T of each matrix g = U S V^T of a stack, by quintic Newton-Schulz (bf16 on CUDA); zero stays zero."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16() if g.is_cuda else g.float()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    tall = x.size(-2) > x.size(-1)
    x = x.mT if tall else x
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum (rows at unit norm with row_norm: MuonEq-R), orthogonalised, after decoupled weight decay.
    Same-shape matrices form a stack, zero-padded to a multiple of the world size: a reduce-scatter (no all-reduce)
    gives rank r the r-th share of its summed gradients (a missing one is zero, as on every rank), one batched
    Newton-Schulz (compiled on CUDA) orthogonalises it, and an all-gather gives every rank every update."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, rt: Runtime, weight_decay: float = 0.0,
                 row_norm: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                                      weight_decay=weight_decay, row_norm=row_norm))
        self.rt = rt
        self.orthogonalize = (torch.compile(newton_schulz_orthogonalize, fullgraph=True) if rt.compile
                              else newton_schulz_orthogonalize)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            stacks = {}
            for p in group["params"]:
                stacks.setdefault(p.shape, []).append(p)
            params, updates = [p for stack in stacks.values() for p in stack], []
            for shape, stack in stacks.items():
                share = -(-len(stack) // self.rt.world)
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in stack]
                grads += [torch.zeros_like(grads[0])] * (share * self.rt.world - len(stack))
                g = self.rt.reduce_scatter(torch.stack(grads))  # this rank's share, summed over ranks
                for i, p in enumerate(stack[self.rt.rank * share:(self.rt.rank + 1) * share]):
                    buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(g[i])
                    g[i].add_(buf, alpha=group["momentum"])
                g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-7) if group["row_norm"] else g
                scale = max(1.0, shape[0] / shape[1]) ** 0.5  # tall matrices: the RMS of wide ones
                u = self.orthogonalize(g, group["backend_steps"]) * scale
                updates += self.rt.all_gather(u)[:len(stack)].to(stack[0].dtype).unbind()
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, updates, alpha=-group["lr"])


def build_optimizers(model: ByteJEPA, args: Hyperparameters, rt: Runtime) -> list[torch.optim.Optimizer]:
    """Muon for linear layers' matrices; Adam for embeddings, head and control tensors (no weight decay on controls)."""
    embed = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)] + [model.slot_pos]
    head = [model.head.weight]
    matrices = [m.weight for m in model.modules() if isinstance(m, CastedLinear) and m is not model.head]
    chosen = {id(p) for p in embed + head + matrices}
    scalars = [p for p in model.parameters() if id(p) not in chosen]
    wd = dict(weight_decay=args.weight_decay)
    adam = torch.optim.AdamW([dict(params=embed, lr=args.embed_lr, **wd), dict(params=head, lr=args.head_lr, **wd),
                              dict(params=scalars, lr=args.scalar_lr)], betas=(args.beta1, args.beta2),
                             eps=args.adam_eps, weight_decay=0.0, fused=rt.cuda)
    muon = Muon(matrices, args.matrix_lr, args.muon_momentum, args.muon_backend_steps, rt, args.weight_decay,
                args.muon_row_norm)
    for group in adam.param_groups + muon.param_groups:
        group["base_lr"] = group["lr"]
    return [adam, muon]


# ---- Training: schedule, weight averaging, late QAT, the wallclock-capped loop ----------------------------------

def lr_scale(step: int, elapsed_ms: float, args: Hyperparameters, cap_ms: float | None = None) -> float:
    """1 until the warmdown, then linear to 0: by steps without a cap, by remaining wallclock with one (WARMDOWN_FRAC
    of cap_ms, default the knobs', or WARMDOWN_ITERS steps at the step time so far). LR = base x (LR_FLOOR + (1 -
    LR_FLOOR) x scale): late QAT and SWA, which read the scale, start at the same point whatever the floor."""
    cap_ms = 1000.0 * args.training_cap_seconds() if cap_ms is None else cap_ms
    if cap_ms <= 0:
        return min(max(args.iterations - step, 0) / max(args.warmdown_iters, 1), 1.0)
    warmdown_ms = (args.warmdown_iters * elapsed_ms / max(step, 1) if args.warmdown_frac is None
                   else args.warmdown_frac * cap_ms)
    remaining_ms = max(cap_ms - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def muon_momentum(step: int, args: Hyperparameters) -> float:
    frac = min(step / args.muon_momentum_warmup_steps, 1.0) if args.muon_momentum_warmup_steps else 1.0
    return (1 - frac) * args.muon_momentum_warmup_start + frac * args.muon_momentum


class WeightAverager:
    """EMA of the weights, or SWA: the mean of snapshots every SWA_EVERY steps once lr_scale < SWA_START_SCALE."""

    def __init__(self, model: nn.Module, args: Hyperparameters):
        self.kind, self.args, self.snapshots = args.weight_avg, args, 0
        self.params = list(model.parameters())
        self.avg = [p.detach().float().clone() for p in self.params] if self.kind == "ema" else \
            [torch.zeros_like(p, dtype=torch.float32) for p in self.params]

    @torch.no_grad()
    def update(self, step: int, scale: float):
        if self.kind == "ema":
            torch._foreach_lerp_(self.avg, [p.detach().float() for p in self.params], 1.0 - self.args.ema_decay)
        elif self.kind == "swa" and scale < self.args.swa_start_scale and step % self.args.swa_every == 0:
            torch._foreach_add_(self.avg, [p.detach().float() for p in self.params])
            self.snapshots += 1

    @torch.no_grad()
    def apply(self) -> str:
        if self.kind == "none" or (self.kind == "swa" and self.snapshots == 0):
            return f"weight_avg:{self.kind} applied:none (live weights exported)"
        for p, a in zip(self.params, self.avg):
            p.copy_(a / self.snapshots if self.kind == "swa" else a)
        detail = f"decay:{self.args.ema_decay}" if self.kind == "ema" else f"snapshots:{self.snapshots}"
        return f"weight_avg:{self.kind} {detail} applied"

    def after_divergence(self) -> str:
        """Why the averaged weights of a run that diverged are not exported either."""
        if self.kind != "ema" and not self.snapshots:
            return "no averaged weights"
        finite = all(bool(torch.isfinite(a).all()) for a in self.avg)
        return f"the {self.kind.upper()} weights are {'finite, but no result either' if finite else 'non-finite too'}"


class Diverged(RunError):
    """A non-finite loss in training or TTT: nothing is exported, or scored, from such weights."""
    exit_code = 5


def set_late_qat(model: nn.Module, on: bool) -> None:
    for name, m in model.named_modules():
        if isinstance(m, CastedLinear):
            m.qat = on and stored_as_int6(f"{name}.weight", m.weight)


BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("B200", 2250.0))  # dense bf16 per card, by name; the first match wins


class SharedClock:
    """Training ms, the max over ranks, waiting for step n-1 only (no GPU drain); the same host all-reduce carries the
    loss of the step that has ended (non-finite if so on any rank) and stop signals: all ranks stop after one step."""

    def __init__(self, rt: Runtime):
        self.rt, self.pending = rt, (0, torch.zeros(()), None)  # a queued step: number, loss on the host, end event

    def read(self, elapsed_ms: float, step: int, loss: Tensor) -> tuple[float, int, float]:
        """-> (shared ms, the last step that has ended, its loss). Raises Stopped."""
        if self.rt.cuda:  # step n is queued: wait for step n-1's end, when its loss has landed in pinned memory
            host = torch.empty((), pin_memory=True).copy_(loss, non_blocking=True)
            (step, loss, ended), self.pending = self.pending, (step, host, torch.cuda.current_stream().record_event())
            if ended is not None:
                ended.synchronize()
        value = loss.item()
        shared_ms, bad = self.rt.meet(elapsed_ms, 0.0 if math.isfinite(value) else 2.0 if math.isnan(value) else 1.0)
        return shared_ms, step, math.nan if bad == 2 else math.inf if bad else value


def estimate_size(step: int, model: nn.Module, cap: int, log, worker: ThreadPoolExecutor) -> Future:
    """Once, early, the weights' int6 RTN + LZMA size for the log, from a CPU thread: the copy goes to pinned memory on
    the compute stream (the optimizer's next update follows it; the host never waits), and the thread waits for it."""
    state = {k: v.detach().to("cpu", copy=True, non_blocking=True) for k, v in model.state_dict().items()}
    copied = torch.cuda.current_stream().record_event() if next(model.parameters()).is_cuda else None

    def report():
        if copied is not None:
            copied.synchronize()
        model_bytes, code_bytes = len(serialize_artifact(quantize_state(state))), len(Path(__file__).read_bytes())
        verdict = "fits" if model_bytes + code_bytes <= cap else "over: the export will coarsen it to fit"
        log(f"size_estimate: weights at step {step} would compress to {model_bytes} bytes, "
            f"{model_bytes + code_bytes} with the code, cap {cap} ({verdict}; int6 round-to-nearest)")
    return worker.submit(report)


class Trainer:
    """Owns the model's optimizers, data and schedule; `run` trains until ITERATIONS or the wallclock cap."""

    def __init__(self, args: Hyperparameters, rt: Runtime, model: ByteJEPA, val_tokens: np.ndarray, log):
        self.args, self.rt, self.model, self.val_tokens, self.log = args, rt, model, val_tokens, log
        self.optimizers = build_optimizers(model, args, rt)
        self.adam_params = [p for group in self.optimizers[0].param_groups for p in group["params"]]  # Muon: its own
        self.loss_fn = torch.compile(model, dynamic=False, fullgraph=True) if rt.compile else model
        self.loader = DistributedTokenLoader(args, rt.rank, rt.device)
        self.worker = ThreadPoolExecutor(max_workers=1)  # the size estimate's; starts its thread on the first submit
        self.calibration_reserve = args.gptq_reserve_seconds or 0.0  # auto: measured in `prime`
        card = torch.cuda.get_device_name(rt.device) if rt.cuda else ""  # CPUs and unknown cards: no MFU
        self.peak_flops = next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS if key in card), None)
        self.flops_per_byte = sum(flops_per_byte(args, training=True).values())

    def step(self, step: int, scale: float) -> Tensor:
        """One optimizer step over grad_accum_steps micro-batches; returns the mean byte CE on this rank."""
        args, accum = self.args, self.args.grad_accum_steps
        directions = sigreg_directions(args.latent_dim, args.sigreg_slices, args.seed + step, self.rt.device)
        ce_total = torch.zeros((), device=self.rt.device)
        for _ in range(accum):
            with self.rt.autocast():
                ce, mse, reg = self.loss_fn(self.loader.next_batch(), directions)
            loss = args.ce_weight * ce + args.jepa_weight * mse + args.sigreg_weight * reg
            (loss / (accum * self.rt.world)).backward()
            ce_total += ce.detach()
        all_reduce_grads(self.adam_params, self.rt)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * (args.lr_floor + (1.0 - args.lr_floor) * scale)
                if isinstance(opt, Muon):
                    group["momentum"] = muon_momentum(step, args)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return ce_total / accum

    def prime(self):
        """Before the clock, then undone: WARMUP_STEPS steps (last half with late QAT), eval/TTT graphs, GPTQ timing."""
        args = self.args
        measure = args.quant == "gptq" and args.gptq_reserve_seconds is None and args.max_wallclock_seconds > 0
        if not (args.warmup_steps or self.rt.compile or measure):
            return
        weights = copy.deepcopy(self.model.state_dict())
        states = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]
        times = [self.rt.now()]  # the first step compiles the training graph
        for i in range(args.warmup_steps):
            self.rt.meet(phase=f"training (warm-up priming, step {i + 1}/{args.warmup_steps})")
            set_late_qat(self.model, args.late_qat_threshold > 0 and 2 * i >= args.warmup_steps)
            self.step(i, 1.0)
            times.append(self.rt.now())
        set_late_qat(self.model, False)
        if self.rt.compile:
            prime_evaluation_graphs(self.model, self.loader, args, self.rt)
            self.log(f"compile: the evaluation and TTT graphs in {self.rt.now() - times[-1]:.1f}s")
        if measure:  # GPTQ_RESERVE_SECONDS=auto: one calibration batch timed (after one untimed), x batches x 1.5 + 1 s
            for _ in range(2):  # the second is timed: the first pays for warm-up
                t = self.rt.now()
                collect_hessians(self.model, self.loader, args, self.rt, batches=1)
            batch_s = self.rt.meet(self.rt.now() - t)[0]  # one reserve for every rank
            self.calibration_reserve = 1.5 * args.gptq_calib_batches * batch_s + 1.0
            self.log(f"gptq_reserve: auto {self.calibration_reserve:.2f}s (one calibration batch {batch_s:.3f}s x "
                     f"{args.gptq_calib_batches} batches x 1.5 + 1s)")
            self.model.train()
        self.model.load_state_dict(weights)
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)
        self.loader = DistributedTokenLoader(args, self.rt.rank, self.rt.device)
        if args.warmup_steps:
            self.log(f"warmup_priming: {args.warmup_steps} steps done (first, compiling: {times[1] - times[0]:.1f}s; "
                     f"others {(times[-1] - times[1]) / max(len(times) - 2, 1):.3f}s), weights and optimizer restored")

    def run(self) -> dict:
        args, rt, log = self.args, self.rt, self.log
        self.model.train()
        self.prime()
        averager, clock = WeightAverager(self.model, args), SharedClock(rt)
        cap_ms = 1000.0 * args.training_cap_seconds(self.calibration_reserve)
        train_ms, shared_ms, step, stop_after, qat_on, estimate = 0.0, 0.0, 0, None, False, None

        def read_clock(elapsed_ms: float) -> float:
            """The shared clock; a non-finite loss on any rank ends the training on every rank."""
            shared_ms, ended, loss = clock.read(elapsed_ms, step, ce)
            if not math.isfinite(loss):
                raise Diverged(f"training diverged: train_loss {loss} at step {ended}/{args.iterations}; lower the "
                               f"learning rates MATRIX_LR={args.matrix_lr:g} EMBED_LR={args.embed_lr:g} HEAD_LR="
                               f"{args.head_lr:g} SCALAR_LR={args.scalar_lr:g}; {averager.after_divergence()}; "
                               f"nothing was exported")
            return shared_ms
        t0 = rt.now()
        while True:
            last = step == args.iterations or (stop_after is not None and step >= stop_after)
            if last and step:  # the last step's loss too, before its weights are read (CUDA's clock read step n-1)
                read_clock(train_ms)
            # the final validation would repeat final_prequant's work (on the live, not the averaged weights)
            if (not args.prequant_eval) if last else (args.val_loss_every and step % args.val_loss_every == 0):
                train_ms += 1000.0 * (rt.now() - t0)
                val = evaluate_standard(self.model, self.val_tokens, args, rt)
                log(f"step:{step}/{args.iterations} val_loss:{val.loss:.4f} val_bpb:{val.bpb:.4f} "
                    f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")
                self.model.train()
                t0 = rt.now()
            if last:
                train_ms += 1000.0 * (rt.now() - t0)
                if stop_after is not None and step < args.iterations:
                    log(f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{step}/{args.iterations}")
                break
            scale = lr_scale(step, shared_ms, args, cap_ms)
            if not qat_on and scale < args.late_qat_threshold:
                set_late_qat(self.model, True)
                qat_on = True
                log(f"late_qat: on at step:{step} lr_scale:{scale:.4f}")
            rt.phase = f"training, step {step + 1}/{args.iterations}"
            ce = self.step(step, scale)
            step += 1
            averager.update(step, scale)
            if rt.master and step == min(100, max(args.iterations // 10, 1)):  # early, past the first big moves
                estimate = estimate_size(step, self.model, args.size_cap_bytes, log, self.worker)
            if step % args.train_log_every == 0 or step <= 10:
                ce = rt.all_reduce(ce) / rt.world
                elapsed_ms = train_ms + 1000.0 * (time.perf_counter() - t0)
                bytes_per_s = step * args.train_batch_tokens / max(elapsed_ms / 1000.0, 1e-9)
                mfu = (f" mfu:{100.0 * self.flops_per_byte * bytes_per_s / (self.peak_flops * rt.world):.1f}%"
                       if self.peak_flops else "")
                log(f"step:{step}/{args.iterations} train_loss:{ce.item():.4f} train_time:{elapsed_ms:.0f}ms "
                    f"step_avg:{elapsed_ms / step:.2f}ms bytes_per_s:{bytes_per_s:.0f}{mfu}")
            shared_ms = read_clock(train_ms + 1000.0 * (time.perf_counter() - t0))
            # stop while one more step (the one in flight on CUDA, the next on CPU) still ends inside the cap
            if cap_ms > 0 and stop_after is None and shared_ms + shared_ms / step >= cap_ms:
                stop_after = step
        set_late_qat(self.model, False)
        self.worker.shutdown()  # waits for the size estimate
        if estimate is not None:
            estimate.result()  # raises what the estimate raised
        log(averager.apply())
        return dict(step_stop=step, wallclock_seconds=round(train_ms / 1e3, 3), reserve=self.calibration_reserve)


# ---- Artifact: int6 quantisation (round-to-nearest or GPTQ), LZMA, size accounting, reloading -------------------

SMALL_TENSOR_MAX = 65_536  # tensors this small stay fp16: int6 would save little and cost accuracy
CLIP_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)  # per-row clip candidates, chosen per tensor
QMAX = 31  # int6 values live in [-31, 31]
NARROWER = {16: 8, 8: 6, 6: 5, 5: 4}  # rate control's ladder for a matrix: fp16 -> int8 -> int6 -> int5 -> int4
ARTIFACT_NAME = "final_model.int6.ptz"


class SizeCapExceeded(RunError):
    """The artifact does not fit the challenge's cap: the run must not pass for a submission."""
    exit_code = 3


class WriteFailed(RunError):
    """The artifact could not be written (a full disk, an unwritable folder, a directory in its place)."""
    exit_code = 6


def stored_as_int6(name: str, t: Tensor) -> bool:
    return (t.ndim == 2 and t.numel() > SMALL_TENSOR_MAX and not name.startswith(TRAINING_ONLY_PREFIXES)
            and not any(c in name for c in CONTROL_TENSOR_NAMES))


def row_scales(w: Tensor, quantile: float, qmax: int = QMAX) -> Tensor:
    clip = torch.quantile(w.abs(), quantile, dim=1) if quantile < 1.0 else w.abs().amax(dim=1)
    return torch.where(clip > 0, clip / qmax, torch.ones_like(clip)).half()


def dequantize(q: Tensor, scales: Tensor) -> Tensor:
    return q.float() * scales.float()[:, None]


def quantize_rtn(w: Tensor, qmax: int = QMAX) -> tuple[Tensor, Tensor]:
    w = w.float()
    scales = (row_scales(w, quantile, qmax) for quantile in CLIP_QUANTILES)
    trials = [(torch.clamp(torch.round(w / s.float()[:, None]), -qmax, qmax).to(torch.int8), s) for s in scales]
    return min(trials, key=lambda trial: (dequantize(*trial) - w).square().sum().item())


def quantize_gptq(w: Tensor, hessian: Tensor, qmax: int = QMAX, block: int = 128,
                  damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """GPTQ: quantise columns one at a time (largest Hessian diagonal first), pushing each one's rounding error onto
    later columns through the inverse Hessian, so the layer's outputs on calibration data move least. RTN's scales."""
    w = w.float().clone()
    _, scales = quantize_rtn(w, qmax)
    s = scales.float()[:, None]
    h = hessian.float().clone()
    dead = torch.diag(h) == 0  # inputs never active: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diag(h).mean() * torch.eye(h.size(0), device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, w.size(1), block):
        i2 = min(i1 + block, w.size(1))
        wb, errs, hb = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2]), hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            q[:, i1 + j:i1 + j + 1] = qj = torch.clamp(torch.round(wb[:, j:j + 1] / s), -qmax, qmax)
            errs[:, j:j + 1] = err = (wb[:, j:j + 1] - qj * s) / hb[j, j]
            wb[:, j:] -= err * hb[j:j + 1, j:]
        w[:, i2:] -= errs @ hinv[i1:i2, i2:]
    return q[:, torch.argsort(order)].to(torch.int8), scales


@torch.no_grad()
def collect_hessians(model: ByteJEPA, loader: DistributedTokenLoader, args: Hyperparameters, rt: Runtime,
                     batches: int | None = None) -> dict[str, Tensor]:
    """X^T X of the inputs of every int6 linear layer over GPTQ_CALIB_BATCHES (or `batches`) training micro-batches
    per rank (training data only, as the rules require), averaged over rows and ranks; q, k and v share one."""
    int6 = {name: m for name, m in model.named_modules()
            if isinstance(m, CastedLinear) and stored_as_int6(f"{name}.weight", m.weight)}
    shared = {name: name[:-1] + "q" for name in int6 if name.endswith((".k", ".v")) and name[:-1] + "q" in int6}
    layers = {name: m for name, m in int6.items() if name not in shared}
    slot = {m: i for i, m in enumerate(layers.values())}
    sums = [torch.zeros(m.in_features, m.in_features, device=rt.device) for m in layers.values()]
    rows = torch.zeros(len(layers), device=rt.device)

    def accumulate(module, inputs, output):
        x = inputs[0].detach().reshape(-1, inputs[0].size(-1)).float()
        sums[slot[module]].addmm_(x.T, x)
        rows[slot[module]] += x.size(0)
    handles = [m.register_forward_hook(accumulate) for m in layers.values()]
    model.eval()
    try:
        for _ in range(batches or args.gptq_calib_batches):
            rt.meet()  # a stop signal ends the calibration on every rank
            with rt.autocast():
                model.forward_logits(loader.next_batch())
    finally:
        for handle in handles:
            handle.remove()
    rt.all_reduce(rows)
    hessians = {name: rt.all_reduce(sums[i]) / rows[i] for i, name in enumerate(layers)}
    return {f"{name}.weight": hessians[shared.get(name, name)] for name in int6}


def quantize_matrix(w: Tensor, hessian: Tensor | None, bits: int = 6) -> dict:
    """{"q": int8 in [-qmax, qmax], "scale": fp16 per row} on the CPU; GPTQ given a Hessian, else RTN, on w's device."""
    qmax = 2 ** (bits - 1) - 1
    w = w.detach().float()
    q, scales = quantize_gptq(w, hessian.to(w.device), qmax) if hessian is not None else quantize_rtn(w, qmax)
    return {"q": q.cpu(), "scale": scales.cpu()}


def quantize_state(state: dict[str, Tensor], hessians: dict[str, Tensor] | None = None) -> dict:
    """The artifact: int6 for large matrices and embeddings (GPTQ given a Hessian), fp32 controls, fp16 the rest."""
    out = {}
    for name, t in state.items():
        Stopped.check()
        if stored_as_int6(name, t):
            out[name] = quantize_matrix(t, hessians.get(name) if hessians else None)
        elif not name.startswith(TRAINING_ONLY_PREFIXES):
            t = t.detach().float()
            out[name] = t.cpu() if any(c in name for c in CONTROL_TENSOR_NAMES) else t.half().cpu()
    return out


def serialize_artifact(qstate: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(qstate, buf)
    return lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ, preset=9)


def quantization_error(w: Tensor, entry: dict | Tensor, hessian: Tensor | None) -> float:
    """||E||^2 / ||W||^2 of a stored matrix, or tr(E H E^T) / tr(W H W^T) (its outputs' change) given a Hessian."""
    w = w.detach().float()
    e = w - (dequantize(entry["q"], entry["scale"]) if isinstance(entry, dict) else entry.float()).to(w.device)
    if hessian is None:
        return (e.square().sum() / w.square().sum().clamp_min(1e-30)).item()
    h = hessian.float().to(w.device)
    return (((e @ h) * e).sum() / ((w @ h) * w).sum().clamp_min(1e-30)).item()


def entropy_bytes(entry: dict | Tensor) -> float:
    """Zeroth-order entropy of a stored matrix's bytes: what an ideal coder would need, a guide to LZMA's."""
    raw = (entry["q"] if isinstance(entry, dict) else entry).contiguous().view(torch.int8)
    counts = torch.bincount(raw.flatten().long() + 128, minlength=256).double()
    p = counts[counts > 0] / raw.numel()
    return -(p * p.log2()).sum().item() * raw.numel() / 8


def build_artifact(state_dict: dict[str, Tensor], args: Hyperparameters, hessians: dict[str, Tensor] | None = None,
                   log=print) -> bytes:
    """The export, rate-controlled to fit SIZE_CAP_BYTES with this script: while over, the matrices whose next width
    down adds least error per byte saved step down (as many as the overshoot needs); SizeCapExceeded if int4 is over."""
    code_bytes = len(Path(__file__).read_bytes())
    budget = args.size_cap_bytes - code_bytes
    hessians = hessians or {}
    qstate = quantize_state(state_dict, hessians)  # without the training-only tensors
    bits = {name: 6 if isinstance(v, dict) else 16 for name, v in qstate.items()
            if isinstance(v, dict) or (v.ndim == 2 and v.dtype == torch.float16)}
    errors = {name: quantization_error(state_dict[name], qstate[name], hessians.get(name)) for name in bits}
    blob, rung, trials = serialize_artifact(qstate), 0, {}  # trials: name -> (entry one width down, its error)

    def report(what: str):
        total, counts = len(blob) + code_bytes, sorted(collections.Counter(bits.values()).items(), reverse=True)
        widths = ", ".join(f"{'fp' if b == 16 else 'int'}{b}: {n}" for b, n in counts)
        log(f"rate_control: step {rung}: {what} ({widths} matrices); artifact {len(blob)} bytes, total {total} "
            f"(cap {args.size_cap_bytes}, {'fits' if total <= args.size_cap_bytes else 'over'}); mean relative "
            f"error {sum(errors.values()) / max(len(errors), 1):.3e}, worst {max(errors.values(), default=0.0):.3e}")
    report("as quantised")
    while len(blob) > budget:
        Stopped.check()
        names = [name for name, b in bits.items() if b in NARROWER]
        if not names:
            log("rate_control: every matrix is at int4, the coarsest width, and the artifact still does not fit")
            check_size(len(blob), code_bytes, log, args.size_cap_bytes)  # logs the sizes and raises
        for name in names:
            if name not in trials:
                entry = quantize_matrix(state_dict[name], hessians.get(name), NARROWER[bits[name]])
                trials[name] = entry, quantization_error(state_dict[name], entry, hessians.get(name))
        saved = {n: entropy_bytes(qstate[n]) - entropy_bytes(trials[n][0]) for n in names}
        cost = {n: (trials[n][1] - errors[n]) / max(saved[n], 1.0) for n in names}
        need, gained = len(blob) - budget, 0.0
        for chosen, name in enumerate(sorted(names, key=cost.get), 1):
            qstate[name], errors[name] = trials.pop(name)
            bits[name] = NARROWER[bits[name]]
            gained += saved[name]
            if gained >= 1.1 * need:  # LZMA gets near the entropy, not below it: a tenth more than the overshoot
                break
        blob, rung = serialize_artifact(qstate), rung + 1
        report(f"{chosen} matrices one width down")
    return blob


def read_artifact(path: str | Path, where: str | None = None) -> dict:
    """The artifact's quantised dict, checked against the format (README); a bad file is a one-line ConfigError."""
    where = where or f"EVAL_ONLY={path}"  # what named the file, for the message
    try:
        data = Path(path).read_bytes()
        raw = lzma.decompress(data)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read the artifact ({e.strerror or e})") from None
    except (lzma.LZMAError, EOFError) as e:
        what = "the artifact file is empty" if not data else f"not an xz/lzma artifact, or truncated ({e})"
        raise ConfigError(f"{where}: {what}") from None
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds (pickle, zip, RuntimeError) for a non-torch payload
        detail = (str(e).strip().splitlines() or [""])[0][:120]
        raise ConfigError(f"{where}: decompressed, not a torch.save payload ({type(e).__name__}: {detail})") from None
    if not isinstance(state, dict) or not state:
        raise ConfigError(f"{where}: expected a non-empty dict (an int6 artifact), found {type(state).__name__}")
    for name, v in state.items():
        if not isinstance(name, str):
            raise ConfigError(f"{where}: expected tensor names as keys, found {name!r}")
        if isinstance(v, dict):
            q, scale = v.get("q"), v.get("scale")
            if (set(v) != {"q", "scale"} or not isinstance(q, Tensor) or not isinstance(scale, Tensor)
                    or q.dtype != torch.int8 or q.ndim != 2 or scale.shape != (q.size(0),)):
                raise ConfigError(f"{where}: entry {name} is not an int6 matrix (q: int8 (rows, cols), scale: (rows,))")
        elif not isinstance(v, Tensor) or not v.is_floating_point():
            raise ConfigError(f"{where}: entry {name} is a {type(v).__name__}, expected a float tensor or int6 matrix")
        elif stored_as_int6(name, v) or name.startswith(TRAINING_ONLY_PREFIXES):
            raise ConfigError(f"{where}: entry {name} is stored as a plain {tuple(v.shape)} tensor, which an "
                              f"artifact never holds; this looks like a state dict, not an int6 artifact")
    return state


def load_artifact(path: str | Path, args: Hyperparameters) -> ByteJEPA:
    """A fresh model (CPU, float32) holding the artifact's dequantised weights; QAT off."""
    model, stored = build_model(args), read_artifact(path)
    state = {k: dequantize(v["q"], v["scale"]) if isinstance(v, dict) else v.float() for k, v in stored.items()}
    own = model.state_dict()
    absent = [k for k in own if k not in state and not k.startswith(TRAINING_ONLY_PREFIXES)]
    wrong = [f"{k} {tuple(v.shape)}" for k, v in state.items() if k not in own or v.shape != own[k].shape]
    if absent or wrong:
        raise ConfigError(f"{path}: artifact does not match the model configured here (missing {absent[:3]}, "
                          f"unexpected {wrong[:3]}); set the same model knobs as the run that wrote it")
    model.load_state_dict(state, strict=False)
    return model


def check_size(model_bytes: int, code_bytes: int, log, cap: int = SIZE_CAP_BYTES) -> int:
    """Logs the size lines reviewers parse; raises SizeCapExceeded past the cap. Returns the total."""
    total = model_bytes + code_bytes
    log(f"Serialized model int6+lzma: {model_bytes} bytes")
    log(f"Code size: {code_bytes} bytes")
    log(f"Total submission size int6+lzma: {total} bytes (cap {cap}, margin {cap - total} bytes)")
    if total > cap:
        log(f"!!! SIZE CAP EXCEEDED: {total} bytes is {total - cap} bytes over the {cap}-byte cap; "
            f"this artifact is not a valid submission !!!")
        raise SizeCapExceeded(f"SIZE_CAP_BYTES={cap}: code + artifact take {total} bytes, {total - cap} over the "
                              f"cap; this is not a valid submission")
    return total


def export_artifact(model: ByteJEPA, hessians: dict | None, args: Hyperparameters, rt: Runtime, log) -> Path:
    """Rank 0 builds and writes the artifact, whole or not at all; all ranks return its path or raise rank 0's error."""
    path, failure = Path("preflight_model.int6.ptz" if args.preflight else ARTIFACT_NAME), None  # beside a real one
    if rt.master:
        try:
            blob = build_artifact(model.state_dict(), args, hessians, log)
            Stopped.check()
            write_atomically(path, blob)
            rt.artifact = path  # for the line if a stop signal arrives now
        except (SizeCapExceeded, Stopped) as e:
            failure = e
        except OSError as e:
            failure = WriteFailed(f"{path.resolve()}: cannot write the artifact ({e.strerror or e}); free disk space "
                                  f"or fix the path")
    exit_code = int(rt.meet(failure.exit_code if failure else 0)[0])  # every rank stops, not only rank 0
    if exit_code:
        raise failure or RunError("rank 0 could not export the artifact", exit_code)
    return path


# ---- Evaluation: exact BPB, window plans, standard and sliding evaluation, score-first test-time training -------

class TargetCountMismatch(RunError):
    """An evaluation scored other targets than the split holds: its score must never be reported."""
    exit_code = 4


class Totals:
    """Summed NLL (nats, float64), targets and bytes (ids >= 4); `breakdown`: the same per bucket of `labels`."""

    def __init__(self, values: Tensor | None = None, breakdown: Tensor | None = None, labels: list[str] = ()):
        self.values = torch.zeros(3, dtype=torch.float64) if values is None else values.detach().cpu().double()
        self.labels = list(labels)
        self.breakdown = (torch.zeros(len(self.labels), 3, dtype=torch.float64) if breakdown is None
                          else breakdown.detach().cpu().double())

    @property
    def loss(self) -> float:
        return self.values[0].item() / max(self.values[1].item(), 1.0)

    @property
    def bpb(self) -> float:
        return self.values[0].item() / math.log(2) / max(self.values[2].item(), 1.0)

    @property
    def targets(self) -> int:
        return int(self.values[1].item())


def plan_windows(num_tokens: int, window: int, stride: int, chunk_tokens: int = 0) -> list[tuple[int, int, int]]:
    """(start, lo, hi): tokens[start:start+window] scores targets lo..hi-1, each of 1..num_tokens-1 once: the first
    window all its own, later ones the next `stride` at their end (most left context), none across chunk_tokens."""
    if num_tokens < window:
        raise ValueError(f"{num_tokens} tokens cannot fill one window of {window}")
    spans, lo = [], 1
    while lo < num_tokens:
        hi = min(window if lo == 1 else lo + stride, num_tokens)
        if chunk_tokens:
            hi = min(hi, (lo // chunk_tokens + 1) * chunk_tokens)
        spans.append((max(0, hi - window), lo, hi))
        lo = hi
    return spans


def rank_share(items: list, rt: Runtime) -> list:
    """This rank's contiguous share of a list (sizes differ by at most one)."""
    return items[rt.rank * len(items) // rt.world:(rt.rank + 1) * len(items) // rt.world]


def gather_windows(tokens: np.ndarray, starts: list[int], window: int, device: torch.device) -> Tensor:
    return to_device(torch.from_numpy(np.stack([tokens[s:s + window] for s in starts]).astype(np.int64)), device)


BYTE_CLASSES = ("lower", "upper", "digit", "space", "punct", "utf8_lead", "utf8_cont", "bos")


def byte_class(token: int) -> int:
    """Index in BYTE_CLASSES; "bos" holds BOS and the other special ids (charged, no byte)."""
    b = token - BYTE_OFFSET
    if b < 0 or b >= 0x80:
        return 7 if b < 0 else 5 if b >= 0xC0 else 6
    c = chr(b)
    return 0 if c.islower() else 1 if c.isupper() else 2 if c.isdigit() else 3 if c in " \t\n\r\v\f" else 4


def range_labels(lows: list[int], end: int | None) -> list[str]:
    """Names of the integer ranges starting at `lows`, the last ending before `end` (None: open-ended)."""
    return [f"{lo}+" if hi is None else str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}"
            for lo, hi in zip(lows, [*lows[1:], end])]


class Breakdown:
    """Where the bits go: each scored target adds its NLL, 1 and its byte count to one bucket per grouping: its slot
    (windows patched from their first byte), byte class, distance from the last BOS and index in window (log-spaced)."""

    def __init__(self, tokens: np.ndarray, args: Hyperparameters, device: torch.device):
        self.labels, self.rows = [], []  # bucket names; each grouping's rows of them
        if not args.eval_breakdown:
            return
        self.doc_starts = np.union1d(0, np.flatnonzero(tokens == BOS_ID))  # the stream's start counts as one
        doc_lows = [0] + [1 << k for k in range(17)]  # 0 (the BOS itself), 1, 2-3, ..., 65536+
        context_lows = [1] + [1 << k for k in range(1, args.window.bit_length()) if 1 << k < args.window]
        groupings = {"slot": range(args.patch_max), "class": BYTE_CLASSES, "doc_pos": range_labels(doc_lows, None),
                     "context": range_labels(context_lows, args.window)}
        ends = np.cumsum([len(buckets) for buckets in groupings.values()]).tolist()
        self.rows = [slice(end - len(buckets), end) for end, buckets in zip(ends, groupings.values())]
        self.labels = [f"{name}:{b}" for name, buckets in groupings.items() for b in buckets]
        self.pos = torch.arange(args.window, device=device)
        self.layout = functools.partial(patch_layout, patching=args.patching, P=args.patch_max, slots=args.patch_slots)
        self.context = torch.bucketize(self.pos, torch.tensor(context_lows[1:], device=device), right=True)
        self.classes = torch.tensor([byte_class(t) for t in range(args.vocab_size)], device=device)
        self.doc_lows = torch.tensor(doc_lows[1:], device=device)

    def add(self, buckets: Tensor, ids: Tensor, starts: list[int], per_target: Tensor) -> None:
        """Adds sums (B, W, 3) to each grouping's buckets, on the device; doc positions may start before the window."""
        before = np.asarray(starts) - self.doc_starts[np.searchsorted(self.doc_starts, starts, side="right") - 1]
        last_start = torch.where(ids == BOS_ID, self.pos, -to_device(torch.from_numpy(before), ids.device)[:, None])
        doc_pos = self.pos - last_start.cummax(dim=1).values
        by_position, flat = per_target.sum(0), per_target.flatten(0, 1)  # by position: summed over windows first
        slot, byte, doc, context = self.rows
        buckets[slot].index_add_(0, self.layout(ids)[1].flatten(), flat)
        buckets[byte].index_add_(0, self.classes[ids].flatten(), flat)
        buckets[doc].index_add_(0, torch.bucketize(doc_pos, self.doc_lows, right=True).flatten(), flat)
        buckets[context].index_add_(0, self.context, by_position)


@torch.inference_mode()
def score_spans(logits_fn, tokens: np.ndarray, spans: list[tuple[int, int, int]], window: int, batch_seqs: int,
                rt: Runtime, breakdown: Breakdown) -> Totals:
    """Sums over each rank's own spans, all-reduced; padding windows that score nothing give every batch one shape.
    The breakdown's sums are added on the device (no host sync) and reduced with the headline's, in one tensor."""
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)
    buckets = torch.zeros(len(breakdown.labels), 3, dtype=torch.float64, device=rt.device)
    pos = torch.arange(window, device=rt.device)
    for i in range(0, len(spans), batch_seqs):
        batch = spans[i:i + batch_seqs]
        pad = batch_seqs - len(batch)
        starts = [s for s, _, _ in batch] + [batch[0][0]] * pad
        ids = gather_windows(tokens, starts, window, rt.device)
        bounds = to_device(torch.tensor([(lo - s, hi - s) for s, lo, hi in batch] + [(0, 0)] * pad), rt.device)
        with rt.autocast():
            logits = logits_fn(ids)
        nll = F.cross_entropy(logits.double().transpose(1, 2), ids, reduction="none")  # exact to ~1e-15
        scored = (pos >= bounds[:, :1]) & (pos < bounds[:, 1:])
        charged, counted = torch.where(scored, nll, 0.0), scored & (ids >= BYTE_OFFSET)
        sums += torch.stack((charged.sum(), scored.sum(), counted.sum()))  # nll, targets, bytes among them
        if breakdown.labels:
            breakdown.add(buckets, ids, starts, torch.stack((charged, scored.double(), counted.double()), dim=-1))
    reduced = rt.all_reduce(torch.cat((sums, buckets.flatten())))
    totals = Totals(reduced[:3], reduced[3:].view(-1, 3), breakdown.labels)
    if not math.isfinite(totals.loss):  # weights gone non-finite (in TTT, or trained so) give no score, on any rank
        raise Diverged(f"{rt.phase} scored a non-finite loss ({totals.loss}); no score is reported (after TTT's "
                       f"adaptation: lower TTT_LR)")
    return totals


def eval_batch_seqs(args: Hyperparameters, rt: Runtime) -> int:
    """Windows per forward: VAL_BATCH_SIZE's share, capped by a TTT chunk's windows per rank: one shape, one compile."""
    per_chunk = -(-args.ttt_chunk_tokens // args.val_sliding_stride)
    return max(1, min(args.val_batch_size // (8 * args.train_seq_len), -(-per_chunk // rt.world)))


def logits_function(model: ByteJEPA, rt: Runtime):
    return torch.compile(model.forward_logits, dynamic=False, fullgraph=True) if rt.compile else model.forward_logits


def check_targets(totals: Totals, num_tokens: int, name: str) -> None:
    if totals.targets != num_tokens - 1:
        raise TargetCountMismatch(f"{name} evaluation scored {totals.targets} targets but the split has "
                                  f"{num_tokens - 1}; its score is void and is not reported")


def evaluate_standard(model: ByteJEPA, tokens: np.ndarray, args: Hyperparameters, rt: Runtime,
                      logits_fn=None) -> Totals:
    """Non-overlapping windows (neighbours share one byte) over the whole split, tail included, shared across ranks."""
    model.eval()
    spans = rank_share(plan_windows(len(tokens), args.window, args.window - 1), rt)
    totals = score_spans(logits_fn or model.forward_logits, tokens, spans, args.window, eval_batch_seqs(args, rt), rt,
                         Breakdown(tokens, args, rt.device))
    check_targets(totals, len(tokens), "standard")
    return totals


def ttt_parameters(model: ByteJEPA, args: Hyperparameters) -> list[nn.Parameter]:
    """TTT adapts the stored weights outside the first TTT_FREEZE_BLOCKS blocks, and only they require gradients."""
    frozen = {id(p) for m in (*model.blocks[:args.ttt_freeze_blocks], model.projector) for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    return [p for p in model.parameters() if id(p) not in frozen]


def prime_evaluation_graphs(model: ByteJEPA, loader: DistributedTokenLoader, args: Hyperparameters, rt: Runtime):
    """Compiles the scoring graph and TTT's forward+backward at their evaluation shapes before any clock runs: graphs
    are cached per code object, so the artifact's fresh model reuses them. The caller restores the weights."""
    ids, rows = loader.next_batch(), eval_batch_seqs(args, rt)  # windows of the evaluation's width; content is moot
    ids = ids.repeat(-(-rows // ids.size(0)), 1)
    score = logits_function(model, rt)
    model.eval()
    with torch.inference_mode(), rt.autocast():  # inference tensors, as score_spans makes them
        score(ids[:rows].clone())
    if args.ttt_enabled and args.ttt_epochs > 0:
        ttt_parameters(model, args)  # the requires_grad pattern TTT will have, which the graphs depend on
        windows = (args.ttt_chunk_tokens - args.window) // (args.window - 1) + 1
        mine = len(rank_share(list(range(min(args.ttt_batch_seqs, windows))), rt))
        with torch.inference_mode(), rt.autocast():
            score(ids[:rows].clone())
        model.train()
        if mine:
            with rt.autocast():
                torch.compile(model, dynamic=False, fullgraph=True)(ids[:mine])[0].backward()
        model.zero_grad(set_to_none=True)
        model.requires_grad_(True)
    model.train()


def adapt_on_chunk(model: ByteJEPA, loss_fn, opt: torch.optim.Optimizer, params: list[Tensor], chunk: np.ndarray,
                   args: Hyperparameters, rt: Runtime) -> None:
    """TTT_EPOCHS of SGD on the chunk's scored tokens: windows sharing a byte, TTT_BATCH_SEQS a step across ranks."""
    starts = list(range(0, len(chunk) - args.window + 1, args.window - 1))
    model.train()
    for _ in range(args.ttt_epochs):
        for b in range(0, len(starts), args.ttt_batch_seqs):
            rt.meet()  # a stop signal ends the adaptation on every rank
            batch = starts[b:b + args.ttt_batch_seqs]
            mine = rank_share(batch, rt)
            opt.zero_grad(set_to_none=True)
            if mine:
                with rt.autocast():
                    ce = loss_fn(gather_windows(chunk, mine, args.window, rt.device))[0]
                (ce * len(mine) / len(batch)).backward()
            all_reduce_grads(params, rt)
            if args.ttt_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.ttt_grad_clip)
            opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


def evaluate_score_first(model: ByteJEPA, tokens: np.ndarray, args: Hyperparameters, rt: Runtime, log,
                         adapt: bool, eval_t0: float) -> tuple[Totals, list[Totals]]:
    """Sliding windows in TTT_CHUNK_TOKENS chunks; with `adapt` (score-first TTT) each chunk's scores are final before
    it is trained on (the last never is). Adaptation, never scoring, stops if it would project past EVAL_MAX_SECONDS."""
    spans = plan_windows(len(tokens), args.window, args.val_sliding_stride, args.ttt_chunk_tokens)
    num_chunks = (len(tokens) + args.ttt_chunk_tokens - 1) // args.ttt_chunk_tokens
    by_chunk = [[] for _ in range(num_chunks)]
    for span in spans:
        by_chunk[span[1] // args.ttt_chunk_tokens].append(span)
    logits_fn, batch_seqs = logits_function(model, rt), eval_batch_seqs(args, rt)
    params = ttt_parameters(model, args)
    opt = torch.optim.SGD(params, lr=args.ttt_lr, momentum=args.ttt_momentum) if adapt else None
    loss_fn = torch.compile(model, dynamic=False, fullgraph=True) if adapt and rt.compile else model
    adapting = adapt and args.ttt_epochs > 0
    breakdown = Breakdown(tokens, args, rt.device)
    totals, per_chunk, score_times, adapt_times = Totals(labels=breakdown.labels), [], [], []
    name = "ttt" if adapt else "sliding"
    model.eval()
    for c, chunk in enumerate(by_chunk):
        rt.meet(phase=f"evaluation ({name}, chunk {c + 1}/{num_chunks})")
        t = rt.now()
        chunk_totals = score_spans(logits_fn, tokens, rank_share(chunk, rt), args.window, batch_seqs, rt, breakdown)
        per_chunk.append(chunk_totals)
        totals.values += chunk_totals.values
        totals.breakdown += chunk_totals.breakdown
        score_times.append(time.perf_counter() - t)  # Totals are on the host: the scoring has finished
        if adapting and c < num_chunks - 1:
            # rates leave out the first scoring and the first adaptation, which include compilation
            score_rate = sum(score_times[1:]) / max(len(score_times) - 1, 1)
            adapt_rate = sum(adapt_times[1:]) / (len(adapt_times) - 1) if len(adapt_times) > 1 else sum(adapt_times)
            projected = time.perf_counter() - eval_t0 + adapt_rate + (num_chunks - c - 1) * score_rate
            if rt.meet(float(projected > args.eval_max_seconds))[0]:  # all ranks decide alike
                adapting = False
                log(f"ttt_budget_stop: adaptation stopped before chunk {c + 1}/{num_chunks}: projected finish "
                    f"{projected:.1f}s > EVAL_MAX_SECONDS={args.eval_max_seconds:.0f}s; the remaining chunks are "
                    f"scored without adaptation")
            else:
                t = time.perf_counter()
                opt.param_groups[0]["lr"] = args.ttt_lr * 0.5 * (1 + math.cos(math.pi * c / max(num_chunks - 1, 1)))
                lo, hi = c * args.ttt_chunk_tokens, min((c + 1) * args.ttt_chunk_tokens, len(tokens))
                adapt_on_chunk(model, loss_fn, opt, params, tokens[lo:hi], args, rt)
                adapt_times.append(rt.now() - t)
        if (c + 1) % args.ttt_log_every == 0 or c == num_chunks - 1:
            log(f"{name}_chunk:{c + 1}/{num_chunks} running_bpb:{totals.bpb:.4f} "
                f"elapsed:{time.perf_counter() - eval_t0:.1f}s score:{sum(score_times):.1f}s "
                f"adapt:{sum(adapt_times):.1f}s adapted_chunks:{len(adapt_times)}")
    check_targets(totals, len(tokens), name)
    log(f"{name}_targets_scored:{totals.targets} expected:{len(tokens) - 1} ok")
    return totals, per_chunk


# ---- Main: setup -> train -> average -> calibrate/quantise/export -> evaluate -> report -------------------------

class Logger:
    """Rank 0 writes each line to the console and to logs/<RUN_ID>.txt, flushed at once: a crash loses nothing."""

    def __init__(self, run_id: str, master: bool):
        self.master, self.file = master, None
        if master:
            Path("logs").mkdir(exist_ok=True)
            (Path("logs") / f"{run_id}.submission.json").unlink(missing_ok=True)  # a reused RUN_ID's, not this run's
            self.file = open(Path("logs") / f"{run_id}.txt", "a", encoding="utf-8")

    def __call__(self, msg: str, console: bool = True):
        if self.master and console:
            print(msg, flush=True)
        if self.file:
            print(msg, file=self.file, flush=True)

    def close(self):
        if self.file:
            self.file.close()


def describe_hardware(rt: Runtime) -> str:
    return (f"{rt.world}x {torch.cuda.get_device_name(rt.device)}" if rt.cuda else
            f"{rt.world} process(es) on CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")


def log_run_header(args: Hyperparameters, rt: Runtime, log) -> None:
    log(Path(__file__).read_text(encoding="utf-8"), console=False)
    log("=" * 100, console=False)
    for key, value in sorted(vars(args).items()):
        log(f"hparam {key}={value}", console=False)
    log(f"python {sys.version.split()[0]} torch {torch.__version__} cuda {torch.version.cuda} "
        f"world_size:{rt.world} grad_accum_steps:{args.grad_accum_steps} compile:{rt.compile}")
    log(f"hardware: {describe_hardware(rt)}")
    if rt.cuda:
        log(f"gpus_visible:{torch.cuda.device_count()} nccl:{'.'.join(map(str, torch.cuda.nccl.version()))}")
    if rt.cuda and rt.master and shutil.which("nvidia-smi"):
        log(subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=False).stdout, console=False)
    if args.smoke:
        log(f"data: EMBEDDED SAMPLE (pydoc topics, {args.data_path}), not FineWeb: figures are for smoke testing only")


def log_patching(args: Hyperparameters, rt: Runtime, tokens: np.ndarray, split: str, log) -> None:
    """How the split's consecutive windows are patched: mean and longest patch, and the share of bytes in tails cut
    into PATCH_MAX-byte patches because a window ran out of slots (patch_layout)."""
    W, n, patches, longest, capped = args.window, len(tokens) // args.window, 0, 0, 0
    for i in range(0, n, 1024):
        ids = to_device(torch.from_numpy(tokens[i * W:min(n, i + 1024) * W].astype(np.int64)).view(-1, W), rt.device)
        patch, slot, tail = patch_layout(ids, args.patching, args.patch_max, args.patch_slots)
        patches, capped = patches + (patch[:, -1] + 1).sum().item(), capped + (W - tail).sum().item()
        longest = max(longest, slot.max().item() + 1)
    log(f"patching: {args.patching} mean_len:{n * W / max(patches, 1):.2f} max_len:{longest} "
        f"capped:{100 * capped / max(n * W, 1):.3f}% ({split}: {n} windows of {W} bytes, {args.patch_slots} slots)")


def log_peak_memory(rt: Runtime, log) -> None:
    log((f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
         f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB") if rt.cuda else
        f"peak memory (process max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")


def log_final(log, label: str, totals: Totals, eval_ms: float | None = None) -> None:
    """The breakdown's buckets that scored any target (exact sums, bpb, share of all bits), then the score."""
    for name, (nats, count, nbytes) in zip(totals.labels, totals.breakdown.tolist()):
        if count:  # buckets that scored nothing (say, positions past the longest document) are left out
            bpb = f"{nats / math.log(2) / nbytes:.6f}" if nbytes else "-"  # BOS is charged but counts no byte
            log(f"{label}_breakdown {name} nats:{nats!r} targets:{count:.0f} bytes:{nbytes:.0f} bpb:{bpb} "
                f"share:{nats / max(totals.values[0].item(), 1e-300):.6f}")
    timing = f" eval_time:{eval_ms:.0f}ms" if eval_ms is not None else ""
    log(f"{label} val_loss:{totals.loss:.4f} val_bpb:{totals.bpb:.4f}{timing}")
    log(f"{label}_exact val_loss:{totals.loss:.8f} val_bpb:{totals.bpb:.8f}")
    nll, targets, nbytes = totals.values.tolist()
    log(f"{label}_sums nll_nats:{nll!r} targets:{targets:.0f} bytes:{nbytes:.0f}")


def evaluate_artifact(path: Path, args: Hyperparameters, rt: Runtime, val_tokens: np.ndarray, log) -> dict:
    """The evaluations the knobs choose, on the artifact's weights, timed from reading it; the last gives the score."""
    t0 = time.perf_counter()
    model, results = load_artifact(path, args).to(rt.device), {}
    if args.roundtrip_eval:
        label = "final_int6_lzma_roundtrip"
        rt.meet(phase=f"evaluation ({label})")
        results[label] = evaluate_standard(model, val_tokens, args, rt, logits_function(model, rt))
        log_final(log, label, results[label], 1000.0 * (rt.now() - t0))
    for label, enabled, adapt in (("final_sliding", args.sliding_eval, False), ("final_ttt", args.ttt_enabled, True)):
        if enabled:
            results[label], _ = evaluate_score_first(model, val_tokens, args, rt, log, adapt, t0)
            log_final(log, label, results[label], 1000.0 * (rt.now() - t0))
    total_ms = 1000.0 * (rt.now() - t0)
    projected = f" projected_8gpu:{total_ms * rt.world / 8:.0f}ms" if rt.world < 8 else ""
    log(f"eval_total_time:{total_ms:.0f}ms{projected} (budget EVAL_MAX_SECONDS={args.eval_max_seconds:.0f}s)")
    return results


def write_submission(args: Hyperparameters, rt: Runtime, log, results: dict, facts: dict) -> None:
    """logs/<RUN_ID>.submission.json in the challenge's format, filled from this run only (null if unknown)."""
    if not rt.master:
        return
    final = results.get("final_ttt") or results.get("final_sliding") or results.get("final_int6_lzma_roundtrip")
    prequant = results.get("final_prequant")
    on_track = rt.cuda and rt.world == 8 and 0 < args.max_wallclock_seconds <= 600 and not args.smoke
    info = dict(
        name="Byte-level JEPA encoder-decoder", date=time.strftime("%Y-%m-%d", time.gmtime()),
        blurb="Pure-byte JEPA: patch encoder predicting the next patch latent, windowed causal byte decoder "
              "conditioned on it, hashed n-grams; Muon (MuonEq-R, weight decay), EMA, int6 GPTQ + LZMA under rate "
              "control, score-first TTT.",
        track="10min_16mb" if on_track else "non_record", hardware=describe_hardware(rt), run_id=args.run_id,
        val_loss=final.loss if final else None, val_bpb=final.bpb if final else None,
        pre_quant_val_loss=prequant.loss if prequant else None, pre_quant_val_bpb=prequant.bpb if prequant else None,
        **{k: facts.get(k) for k in ("step_stop", "wallclock_seconds", "bytes_total", "bytes_model_int6_lzma",
                                     "bytes_code")})
    path = Path("logs") / f"{args.run_id}.submission.json"
    path.write_text(json.dumps(info, indent=2, allow_nan=False) + "\n")  # strict JSON: every score is finite here
    log(f"submission: {path}")


def train_and_export(args: Hyperparameters, rt: Runtime, val_tokens: np.ndarray, log,
                     facts: dict) -> tuple[Path, ByteJEPA]:
    """Training, weight averaging, GPTQ calibration (inside the training budget), the artifact on disk."""
    model = build_model(args).to(rt.device)
    stored = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(TRAINING_ONLY_PREFIXES))
    log(f"model_params:{sum(p.numel() for p in model.parameters())} (stored: {stored})")
    kernel = "flex_attention (sliding-window block mask)" if rt.cuda else "sdpa (blocks of the window, masked)"
    window = args.decoder_window if 0 < args.decoder_window < args.window else 0
    log("decoder_attention: " + (f"window:{window} kernel:{kernel}" if window else "window:full kernel:sdpa causal"))
    totals = {}  # FLOPs per target byte by component, and their totals
    for kind, training in (("train", True), ("eval", False)):
        parts = flops_per_byte(args, training)
        totals[kind] = sum(parts.values())
        log(f"flops_{kind}_components: " + " ".join(f"{k}:{v:.0f}" for k, v in parts.items()))
    log(f"flops_per_byte train:{totals['train']:.0f} eval:{totals['eval']:.0f}")
    first = load_data_shard(shard_paths(args.data_path, "train")[0], args.vocab_size)[:4 * args.train_batch_tokens]
    log_patching(args, rt, first, "training, the first 4 steps' bytes", log)
    trainer = Trainer(args, rt, model, val_tokens, log)
    facts.update(trainer.run())
    hessians = None
    if args.quant == "gptq":
        rt.meet(phase="export (GPTQ calibration)")
        t = rt.now()
        hessians = collect_hessians(model, trainer.loader, args, rt)
        calib_s = rt.now() - t
        log(f"gptq_calibration: {args.gptq_calib_batches} batches/rank in {calib_s:.2f}s "
            f"(reserved {trainer.calibration_reserve:.2f}s)")
        used = facts["wallclock_seconds"] + calib_s
        if 0 < args.max_wallclock_seconds < used:  # the rules count calibration as training time
            log(f"warning: training + GPTQ calibration took {used:.1f}s, over MAX_WALLCLOCK_SECONDS="
                f"{args.max_wallclock_seconds:.0f}; raise GPTQ_RESERVE_SECONDS")
    rt.meet(phase="export")
    t = time.perf_counter()
    path = export_artifact(model, hessians, args, rt, log)
    log(f"artifact: {path} quant:{args.quant} written in {time.perf_counter() - t:.1f}s")
    return path, model


def preflight_verdict(args: Hyperparameters, facts: dict, eval_s: float, log) -> int:
    """PREFLIGHT=1's last lines: the real run projected from the short one (its steps at the timed ms/step inside the
    cap less the GPTQ reserve, its evaluation scaled up from three TTT chunks), then GO, or NO-GO (exit 3) and why."""
    step_s = facts["wallclock_seconds"] / max(facts["step_stop"], 1)
    cap = args.training_cap_seconds(facts["reserve"])
    steps = min(args.iterations, int(cap / max(step_s, 1e-9))) if cap else args.iterations
    log(f"preflight_projection: {steps} steps of {1000 * step_s:.2f}ms, {steps * args.train_batch_tokens} training "
        f"bytes; evaluation {eval_s:.1f}s (EVAL_MAX_SECONDS={args.eval_max_seconds:g})")
    reasons, free = [], shutil.disk_usage(".").free
    if free < 2 * args.size_cap_bytes:  # the artifact is written beside the one it replaces
        reasons.append(f"{free} bytes free on disk here, fewer than twice SIZE_CAP_BYTES")
    if eval_s > args.eval_max_seconds:
        reasons.append(f"the evaluation is projected at {eval_s:.3g}s, over EVAL_MAX_SECONDS={args.eval_max_seconds:g}")
    log(f"preflight: {'NO-GO ' + '; '.join(reasons) if reasons else 'GO'}")
    return 3 if reasons else 0


def run(args: Hyperparameters, rt: Runtime, log) -> int:
    log_run_header(args, rt, log)
    val_tokens = load_validation_tokens(args)
    log(f"val_tokens:{len(val_tokens)} targets:{len(val_tokens) - 1}")
    log_patching(args, rt, val_tokens, "validation", log)
    facts, results, real, split_tokens = {}, {}, args, len(val_tokens)
    if args.preflight:  # the same run, short: 30 steps, then every evaluation on three TTT chunks, timed
        args = copy.copy(args)
        args.iterations, val_tokens = min(args.iterations, 30), val_tokens[:3 * args.ttt_chunk_tokens]
    path, model = (Path(args.eval_only), None) if args.eval_only else train_and_export(args, rt, val_tokens, log, facts)
    rt.artifact = path
    model_bytes, code_bytes = path.stat().st_size, len(Path(__file__).read_bytes())
    total = check_size(model_bytes, code_bytes, log, args.size_cap_bytes)  # past the cap, the run ends here
    facts.update(bytes_model_int6_lzma=model_bytes, bytes_code=code_bytes, bytes_total=total)
    log_peak_memory(rt, log)
    if model is not None and args.prequant_eval:
        rt.meet(phase="evaluation (final_prequant)")
        results["final_prequant"] = evaluate_standard(model, val_tokens, args, rt, logits_function(model, rt))
        log_final(log, "final_prequant", results["final_prequant"])
    del model
    t = rt.now()
    results.update(evaluate_artifact(path, args, rt, val_tokens, log))
    eval_s = rt.meet((rt.now() - t) * split_tokens / len(val_tokens))[0]  # the slowest rank's, for the whole split
    log_peak_memory(rt, log)
    if args.preflight:
        return preflight_verdict(real, facts, eval_s, log)
    write_submission(args, rt, log, results, facts)
    return 0


def main() -> int:
    master = os.environ.get("RANK", "0") == "0"
    verdict = BOOLEANS.get(os.environ.get("PREFLIGHT", "").strip().lower())  # under PREFLIGHT, errors are NO-GO too
    try:
        args = Hyperparameters()
        check_device(args)
        check_inputs(args)
    except ConfigError as e:
        if master:
            print(f"error: {e}" + (f"\npreflight: NO-GO {e}" if verdict else ""), file=sys.stderr, flush=True)
        else:  # silent, and not first out: torchrun kills the other ranks when one exits, maybe rank 0 before it spoke
            give_up = time.time() + 60
            while not Stopped.signum and time.time() < give_up:
                time.sleep(0.05)
        return 2
    rt = Runtime(args)
    log = Logger(args.run_id, rt.master)
    try:
        code = run(args, rt, log)
        rt.all_reduce(torch.zeros(1), group=rt.host_group)  # a barrier: gloo aborts a group torn down in use
    except (ConfigError, RunError) as e:  # a user mistake found mid-run (2), or what RunError's subclasses name
        if isinstance(e, CollectiveFailed) and Stopped.signum:  # a peer that stopped first broke the collective
            e = Stopped(Stopped.signum)
        line = f"error: {stop_line(e, rt) if isinstance(e, Stopped) else e}"
        line += f"\npreflight: NO-GO {line[7:]}" if args.preflight else ""
        log(line, console=False)
        if rt.master or (isinstance(e, CollectiveFailed) and e.exit_code == CollectiveFailed.exit_code):  # timed out
            print(line, file=sys.stderr, flush=True)
        return 2 if isinstance(e, ConfigError) else e.exit_code
    finally:
        log.close()
        rt.close()
    return code


def stop_line(e: Stopped, rt: Runtime) -> str:
    launch = "python3" if rt.world == 1 else f"torchrun --standalone --nproc_per_node={rt.world}"
    return f"stopped by {e} during {rt.phase}; " + (f"the artifact {rt.artifact} is complete: finish the evaluation "
        f"with EVAL_ONLY={rt.artifact} {launch} train_gpt.py and the same knobs" if rt.artifact else
        "no artifact was written (an earlier one is left as it was)")


if __name__ == "__main__":
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, Stopped.note)
    code = main()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # no C++ teardown: a gloo thread left at exit can abort a done rank
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
