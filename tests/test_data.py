"""Data: the official byte260 shard format (bytes checked with struct, independently of write_shard), rejection of
corrupt shards and incomplete datasets, document encoding, the cycling token stream, the distributed loader (the
same global batch whatever the world size) and the embedded pydoc sample."""
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt
from conftest import write_corpus

MAGIC, VERSION = 20240520, 1


def shard_bytes(tokens, magic=MAGIC, version=VERSION, count=None) -> bytes:
    """A shard as the format spec describes it: 256 little-endian int32 (magic, version, count), uint16 tokens."""
    tokens = [int(t) for t in tokens]
    header = struct.pack("<256i", magic, version, len(tokens) if count is None else count, *[0] * 253)
    return header + struct.pack(f"<{len(tokens)}H", *tokens)


# ---------------------------------------------------------------------------------------------------------------
# Shard format
# ---------------------------------------------------------------------------------------------------------------

def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 260, size=1001).astype(np.uint16)
    tokens[:3] = (0, 259, 1)  # both ends of the vocabulary
    path = tmp_path / "fineweb_train_000000.bin"
    train_gpt.write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * 1001
    header = struct.unpack("<256i", raw[:1024])
    assert header[:3] == (MAGIC, VERSION, 1001) and set(header[3:]) == {0}
    assert struct.unpack("<1001H", raw[1024:]) == tuple(int(t) for t in tokens)
    assert raw == shard_bytes(tokens)
    loaded = train_gpt.load_data_shard(path)
    assert loaded.dtype == np.uint16 and np.array_equal(loaded, tokens)
    assert train_gpt.read_shard_header(path) == 1001
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind


def test_empty_shard_round_trip(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    train_gpt.write_shard(path, np.zeros(0, dtype=np.uint16))
    assert path.read_bytes() == shard_bytes([])
    assert train_gpt.load_data_shard(path).size == 0


def test_load_reads_a_shard_written_by_hand(tmp_path):
    path = tmp_path / "hand.bin"
    path.write_bytes(shard_bytes([1, 76, 109, 259]))
    assert train_gpt.load_data_shard(path).tolist() == [1, 76, 109, 259]


def test_vocabulary_bound_is_the_given_size(tmp_path):
    path = tmp_path / "s.bin"
    path.write_bytes(shard_bytes([1, 99, 5]))
    assert train_gpt.load_data_shard(path, vocab_size=100).tolist() == [1, 99, 5]
    with pytest.raises(train_gpt.ConfigError, match=r"token id 99 .*VOCAB_SIZE=99"):
        train_gpt.load_data_shard(path, vocab_size=99)


GOOD = list(range(1, 41))
CORRUPT = [
    # id, file content, text the message must hold (besides the file's name)
    ("bad-magic", shard_bytes(GOOD, magic=20240521), ["magic", "20240520"]),
    ("bad-version", shard_bytes(GOOD, version=2), ["version"]),
    ("truncated", shard_bytes(GOOD)[:-2], ["1102 bytes", "40 tokens", "truncated"]),
    ("extra-bytes", shard_bytes(GOOD) + b"\x00\x00", ["1106 bytes", "40 tokens"]),
    ("count-too-large", shard_bytes(GOOD, count=41), ["1104 bytes", "41 tokens"]),
    ("count-too-small", shard_bytes(GOOD, count=39), ["1104 bytes", "39 tokens"]),
    ("count-negative", shard_bytes(GOOD, count=-1), ["-1 tokens"]),
    ("token-260", shard_bytes(GOOD[:-1] + [260]), ["token id 260", "VOCAB_SIZE=260"]),
    ("token-65535", shard_bytes([65535] + GOOD), ["token id 65535"]),
    ("empty-file", b"", ["header"]),
    ("short-header", shard_bytes(GOOD)[:1000], ["header"]),
    ("header-cut-mid-word", shard_bytes(GOOD)[:1023], ["header"]),
    ("tiny-file", b"hello", ["header"]),
]


@pytest.mark.parametrize("name, content, reason", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_shard_rejected(tmp_path, name, content, reason):
    path = tmp_path / f"fineweb_val_{name}.bin"
    path.write_bytes(content)
    with pytest.raises(train_gpt.ConfigError) as info:
        train_gpt.load_data_shard(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for text in reason:
        assert text in message, (text, message)


def test_missing_shard_rejected(tmp_path):
    path = tmp_path / "fineweb_train_000007.bin"
    with pytest.raises(train_gpt.ConfigError, match="not found") as info:
        train_gpt.load_data_shard(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# The whole dataset, checked before the run starts
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def corpus_copy(corpus, tmp_path):
    return Path(shutil.copytree(corpus, tmp_path / "copy"))


def check(tiny_args, data_path, **overrides):
    args = tiny_args(DATA_PATH=str(data_path), TOKENIZER_PATH=str(data_path / "tokenizer.json"), **overrides)
    train_gpt.check_inputs(args)
    return args


def test_intact_corpus_passes(tiny_args, corpus_copy):
    args = check(tiny_args, corpus_copy)
    assert [p.name for p in train_gpt.shard_paths(args.data_path, "train")] == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split_rejected(tiny_args, corpus_copy, split):
    for path in corpus_copy.glob(f"fineweb_{split}_*.bin"):
        path.unlink()
    with pytest.raises(train_gpt.ConfigError) as info:
        check(tiny_args, corpus_copy)
    message = str(info.value)
    assert f"DATA_PATH={corpus_copy}" in message
    assert f"fineweb_{split}_*.bin" in message and "python3 data/prepare.py" in message


def test_eval_only_needs_no_training_split(tiny_args, corpus_copy, tmp_path):
    for path in corpus_copy.glob("fineweb_train_*.bin"):
        path.unlink()
    artifact = tmp_path / "model.ptz"
    model = train_gpt.build_model(tiny_args())
    artifact.write_bytes(train_gpt.serialize_artifact(train_gpt.quantize_state(model.state_dict())))
    check(tiny_args, corpus_copy, EVAL_ONLY=str(artifact))  # does not raise


@pytest.mark.parametrize("damage, reason", [
    (lambda raw: raw[:-2], "truncated"),
    (lambda raw: struct.pack("<i", 7) + raw[4:], "magic"),
], ids=["truncated", "bad-magic"])
def test_corrupt_training_shard_caught_before_the_run(tiny_args, corpus_copy, damage, reason):
    path = corpus_copy / "fineweb_train_000001.bin"  # the second shard: checked up front, not when reached
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(train_gpt.ConfigError, match=reason) as info:
        check(tiny_args, corpus_copy)
    assert str(path) in str(info.value)


def test_validation_split_shorter_than_a_window_rejected(tiny_args, tmp_path):
    data = write_corpus(tmp_path / "data", train_docs=4, val_docs=1)
    val = data / "fineweb_val_000000.bin"
    val.write_bytes(shard_bytes([1] + [70] * 40))  # 40 targets < TRAIN_SEQ_LEN 63
    with pytest.raises(train_gpt.ConfigError, match=r"40 targets.*TRAIN_SEQ_LEN=63"):
        check(tiny_args, data)


def test_training_split_without_tokens_rejected(tiny_args, corpus_copy):
    """Empty training shards would leave TokenStream.take looping for ever: refused up front."""
    for path in corpus_copy.glob("fineweb_train_*.bin"):
        path.write_bytes(shard_bytes([]))
    with pytest.raises(train_gpt.ConfigError) as info:
        check(tiny_args, corpus_copy)
    assert "DATA_PATH" in str(info.value) or "fineweb_train" in str(info.value)


def test_validation_tokens_are_the_val_shards_in_order(tiny_args, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "fineweb_val_000001.bin").write_bytes(shard_bytes([1, 7, 8]))
    (data / "fineweb_val_000000.bin").write_bytes(shard_bytes([1, 5, 6]))
    (data / "fineweb_train_000000.bin").write_bytes(shard_bytes([1, 9]))
    args = tiny_args(DATA_PATH=str(data))
    assert train_gpt.load_validation_tokens(args).tolist() == [1, 5, 6, 1, 7, 8]


# ---------------------------------------------------------------------------------------------------------------
# Document encoding
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, ids", [
    ("", [1]),
    ("Hi!", [1, 72 + 4, 105 + 4, 33 + 4]),
    ("a\nb", [1, 97 + 4, 10 + 4, 98 + 4]),
    ("é", [1, 0xC3 + 4, 0xA9 + 4]),
    ("€", [1, 0xE2 + 4, 0x82 + 4, 0xAC + 4]),
    ("x😀", [1, 120 + 4, 0xF0 + 4, 0x9F + 4, 0x98 + 4, 0x80 + 4]),
    ("\x00\x7f", [1, 4, 0x7F + 4]),
])
def test_encode_document(text, ids):
    encoded = train_gpt.encode_document(text)
    assert encoded.dtype == np.uint16
    assert encoded.tolist() == ids


def test_encoded_ids_stay_inside_the_vocabulary():
    encoded = train_gpt.encode_document("".join(chr(c) for c in range(0, 0x800, 7)) + "\U0010FFFF")
    assert encoded[0] == 1 and 1 not in encoded[1:].tolist() and 4 <= encoded[1:].min() and encoded.max() <= 259


# ---------------------------------------------------------------------------------------------------------------
# TokenStream and DistributedTokenLoader
# ---------------------------------------------------------------------------------------------------------------

def write_train_shards(folder, sizes, seed=0):
    """Training shards of random ids; returns their concatenation (the stream's period)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    parts = []
    for i, size in enumerate(sizes):
        tokens = rng.integers(0, 260, size=size).astype(np.uint16)
        train_gpt.write_shard(folder / f"fineweb_train_{i:06d}.bin", tokens)
        parts.append(tokens)
    return np.concatenate(parts)


def test_token_stream_crosses_shards_and_cycles(tmp_path):
    paths = []
    for i, (lo, hi) in enumerate([(0, 50), (50, 130), (130, 160)]):
        paths.append(tmp_path / f"fineweb_train_{i:06d}.bin")
        paths[-1].write_bytes(shard_bytes(range(lo, hi)))
    stream = train_gpt.TokenStream(paths, 260)
    assert stream.take(30).tolist() == list(range(0, 30))
    assert stream.take(40).tolist() == list(range(30, 70))  # shard 0 -> 1
    assert stream.take(100).tolist() == list(range(70, 160)) + list(range(0, 10))  # 1 -> 2 -> back to 0
    assert stream.take(400).tolist() == (list(range(10, 160)) + list(range(160)) + list(range(90)))
    assert stream.take(1).tolist() == [90]


def test_token_stream_single_shard_cycles(tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    path.write_bytes(shard_bytes([5, 6, 7]))
    stream = train_gpt.TokenStream([path], 260)
    assert stream.take(8).tolist() == [5, 6, 7, 5, 6, 7, 5, 6]


def test_token_stream_rejects_bad_shard_when_reached(tmp_path):
    good, bad = tmp_path / "fineweb_train_000000.bin", tmp_path / "fineweb_train_000001.bin"
    good.write_bytes(shard_bytes([1, 2, 3]))
    bad.write_bytes(shard_bytes([1, 300]))
    stream = train_gpt.TokenStream([good, bad], 260)
    assert stream.take(3).tolist() == [1, 2, 3]
    with pytest.raises(train_gpt.ConfigError, match="token id 300") as info:
        stream.take(1)
    assert str(bad) in str(info.value)


STEPS = 3  # optimizer steps drawn: 8 global micro-batches each


def draw(tiny_args, data, world):
    """Per rank, the micro-batches of STEPS steps: 8 // world micro-steps per step on each of `world` ranks."""
    args = tiny_args(DATA_PATH=str(data), WORLD_SIZE=str(world))
    assert args.world_size == world and args.grad_accum_steps == 8 // world
    loaders = [train_gpt.DistributedTokenLoader(args, rank, torch.device("cpu")) for rank in range(world)]
    return [[loader.next_batch() for _ in range(STEPS * args.grad_accum_steps)] for loader in loaders]


@pytest.mark.parametrize("world", [2, 4, 8])
def test_global_batch_is_the_same_bytes_whatever_the_world_size(tiny_args, tmp_path, world):
    data = tmp_path / "data"
    period = write_train_shards(data, [700, 900])  # STEPS x 8 spans of 127 = 3048 tokens: crosses and cycles
    seq, seqs = 63, 1008 // (8 * 63)  # TINY: 2 windows per rank and micro-step
    span = seqs * seq + 1
    stream = np.tile(period, 3)[:STEPS * 8 * span]

    (single,) = draw(tiny_args, data, 1)
    per_rank = draw(tiny_args, data, world)
    assert len(single) == STEPS * 8 and all(len(batches) == STEPS * 8 // world for batches in per_rank)
    interleaved = [per_rank[rank][micro] for micro in range(STEPS * 8 // world) for rank in range(world)]
    assert len(interleaved) == len(single)
    for a, b in zip(single, interleaved):
        assert torch.equal(a, b)

    for micro in range(STEPS * 8 // world):
        intervals = []
        for rank in range(world):
            batch = per_rank[rank][micro]
            assert batch.shape == (seqs, seq + 1) and batch.dtype == torch.int64 and batch.device.type == "cpu"
            assert all(batch[i, -1] == batch[i + 1, 0] for i in range(seqs - 1))  # overlap by one byte
            rebuilt = torch.cat([batch[0]] + [batch[i, 1:] for i in range(1, seqs)]).numpy()
            start = (micro * world + rank) * span
            assert np.array_equal(rebuilt, stream[start:start + span])  # exactly this rank's own span
            intervals.append((start, start + span))
        for (_, end), (next_start, _) in zip(intervals, intervals[1:]):
            assert end <= next_start  # disjoint spans, in rank order


def test_loader_windows_cover_the_stream_in_order(tiny_args, tmp_path):
    data = tmp_path / "data"
    period = write_train_shards(data, [300, 200, 150], seed=1)
    (batches,) = draw(tiny_args, data, 1)
    span = 2 * 63 + 1
    flat = np.concatenate([torch.cat([b[0], b[1, 1:]]).numpy() for b in batches])
    assert np.array_equal(flat, np.tile(period, 6)[:len(batches) * span])


# ---------------------------------------------------------------------------------------------------------------
# The embedded sample (pydoc topics)
# ---------------------------------------------------------------------------------------------------------------

def test_build_embedded_sample(tmp_path):
    from pydoc_data.topics import topics

    out = tmp_path / "sample"
    train_gpt.build_embedded_sample(out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["fineweb_train_000000.bin", "fineweb_val_000000.bin", "tokenizer.json"]

    keys = sorted(topics)
    encode = lambda text: [1] + [b + 4 for b in text.encode("utf-8")]  # noqa: E731
    val = train_gpt.load_data_shard(out / "fineweb_val_000000.bin")
    train = train_gpt.load_data_shard(out / "fineweb_train_000000.bin")
    assert val.tolist() == [t for k in keys[:8] for t in encode(topics[k])]
    assert int((val == 1).sum()) == 8 and int((train == 1).sum()) == len(keys) - 8
    assert train[:200].tolist() == encode(topics[keys[8]])[:200]
    assert len(train) == sum(len(topics[k].encode("utf-8")) + 1 for k in keys[8:])
    assert json.loads((out / "tokenizer.json").read_text()) == train_gpt.PURE_BYTE_TOKENIZER

    # a second call leaves every file alone (neither rewritten nor replaced)
    old = 1_000_000_000
    before = {}
    for p in out.iterdir():
        os.utime(p, ns=(old, old))
        before[p.name] = (p.stat().st_ino, p.stat().st_mtime_ns)
    train_gpt.build_embedded_sample(out)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()} == before
    assert all(mtime == old for _, mtime in before.values())


def test_embedded_sample_passes_check_inputs(tiny_args, tmp_path):
    out = tmp_path / "sample"
    train_gpt.build_embedded_sample(out)
    check(tiny_args, out)
