"""Tests for data/prepare.py. Expected shard bytes are built here from the format spec, independently
of train_gpt.write_shard: 256 little-endian int32 header words (magic, version, count), then uint16 tokens."""

import hashlib
import importlib.util
import json
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PREPARE_PY = REPO / "data" / "prepare.py"
_spec = importlib.util.spec_from_file_location("prepare", PREPARE_PY)
prepare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare)

OFFICIAL_TOKENIZER_JSON = """\
{
  "config": {
    "bos_id": 1,
    "byte_count": 256,
    "byte_offset": 4,
    "eos_id": 2,
    "pad_id": 0,
    "unk_id": 3
  },
  "tokenizer_type": "pure_byte",
  "vocab_size": 260
}
"""


def doc(text_bytes: bytes) -> list[int]:
    return [1] + [b + 4 for b in text_bytes]


def shard_bytes(tokens: list[int]) -> bytes:
    return struct.pack("<256i", 20240520, 1, len(tokens), *[0] * 253) + struct.pack(f"<{len(tokens)}H", *tokens)


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def shard_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("fineweb_*.bin"))}


def run_main(*argv) -> int:
    return prepare.main([str(a) for a in argv])


def run_cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PREPARE_PY), *map(str, argv)], capture_output=True, text=True)


def test_jsonl_split_by_document_count(tmp_path, capsys):
    docs = write_jsonl(tmp_path / "d.jsonl", ["hello", "ab", "", "xyz"])
    assert run_main("--docs", docs, "--output", tmp_path / "out", "--num-val-docs", 2) == 0
    assert shard_files(tmp_path / "out") == {
        "fineweb_train_000000.bin": shard_bytes(doc(b"") + doc(b"xyz")),
        "fineweb_val_000000.bin": shard_bytes(doc(b"hello") + doc(b"ab")),
    }
    out = capsys.readouterr().out
    assert "val: 2 documents, 9 tokens, 1 shard(s)" in out
    assert "train: 2 documents, 5 tokens, 1 shard(s)" in out


def test_text_dir_in_sorted_relative_path_order(tmp_path):
    src = tmp_path / "texts"
    (src / "sub").mkdir(parents=True)
    (src / "b.txt").write_bytes(b"second\r\n")  # bytes kept as they are, no newline translation
    (src / "a.txt").write_bytes(b"first")
    (src / "sub" / "c.txt").write_bytes("d\u00e9j\u00e0".encode())
    (src / "empty.txt").write_bytes(b"")
    assert run_main("--text-dir", src, "--output", tmp_path / "out", "--num-val-docs", 3) == 0
    assert shard_files(tmp_path / "out") == {
        "fineweb_train_000000.bin": shard_bytes(doc("d\u00e9j\u00e0".encode())),
        "fineweb_val_000000.bin": shard_bytes(doc(b"first") + doc(b"second\r\n") + doc(b"")),
    }


def test_shards_roll_over_at_exact_size_and_split_documents(tmp_path):
    docs = write_jsonl(tmp_path / "d.jsonl", ["abcde", "abc", "de", "f", "gh"])
    assert run_main("--docs", docs, "--output", tmp_path / "out", "--num-val-docs", 1, "--shard-size", 4) == 0
    val = doc(b"abcde")  # 6 tokens: a full shard, then 2 carried into the next
    train = doc(b"abc") + doc(b"de") + doc(b"f") + doc(b"gh")  # 12 tokens: exactly three full shards
    assert shard_files(tmp_path / "out") == {
        "fineweb_train_000000.bin": shard_bytes(train[0:4]),
        "fineweb_train_000001.bin": shard_bytes(train[4:8]),
        "fineweb_train_000002.bin": shard_bytes(train[8:12]),
        "fineweb_val_000000.bin": shard_bytes(val[0:4]),
        "fineweb_val_000001.bin": shard_bytes(val[4:6]),
    }


def test_empty_documents_are_lone_bos(tmp_path):
    docs = write_jsonl(tmp_path / "d.jsonl", ["", ""])
    assert run_main("--docs", docs, "--output", tmp_path / "out", "--num-val-docs", 0) == 0
    assert shard_files(tmp_path / "out") == {"fineweb_train_000000.bin": shard_bytes([1, 1])}


def test_multibyte_utf8_and_unencodable_characters(tmp_path):
    text = "\u00e9\u20ac\U0001f600"  # 2-, 3- and 4-byte UTF-8 sequences
    docs = tmp_path / "d.jsonl"  # json escapes can name a lone surrogate, which UTF-8 cannot encode
    docs.write_text(json.dumps({"text": text}, ensure_ascii=False) + '\n{"text": "a\\ud800b\\udfff"}\n', "utf-8")
    assert run_main("--docs", docs, "--output", tmp_path / "out", "--num-val-docs", 1) == 0
    assert shard_files(tmp_path / "out") == {
        "fineweb_train_000000.bin": shard_bytes(doc(b"a?b?")),
        "fineweb_val_000000.bin": shard_bytes(doc(b"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80")),
    }


def test_tokenizer_json_matches_official_file(tmp_path):
    docs = write_jsonl(tmp_path / "d.jsonl", ["x"])
    assert run_main("--docs", docs, "--output", tmp_path / "out") == 0
    assert (tmp_path / "out" / "fineweb_pure_byte_260.json").read_text("utf-8") == OFFICIAL_TOKENIZER_JSON


def test_default_output_is_the_official_layout(tmp_path, monkeypatch):
    assert prepare.DEFAULT_SHARD_DIR == REPO / "data" / "datasets" / "fineweb10B_byte260"
    assert prepare.DEFAULT_TOKENIZER_PATH == REPO / "data" / "tokenizers" / "fineweb_pure_byte_260.json"
    monkeypatch.setattr(prepare, "DEFAULT_SHARD_DIR", tmp_path / "data" / "datasets" / "fineweb10B_byte260")
    monkeypatch.setattr(prepare, "DEFAULT_TOKENIZER_PATH", tmp_path / "data" / "tokenizers" / "tok.json")
    assert run_main("--docs", write_jsonl(tmp_path / "d.jsonl", ["x"])) == 0
    assert shard_files(tmp_path / "data" / "datasets" / "fineweb10B_byte260") == {
        "fineweb_val_000000.bin": shard_bytes(doc(b"x"))}
    assert json.loads((tmp_path / "data" / "tokenizers" / "tok.json").read_text("utf-8"))["vocab_size"] == 260


def test_existing_shards_refused_without_replace_and_replaced_with_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "fineweb_train_000007.bin").write_bytes(b"old")
    (out / "notes.txt").write_text("kept")
    docs = write_jsonl(tmp_path / "d.jsonl", ["x"])
    result = run_cli("--docs", docs, "--output", out)
    assert result.returncode == 2
    assert result.stderr == f"error: {out} already holds 1 shard(s); pass --replace to overwrite them\n"
    assert (out / "fineweb_train_000007.bin").read_bytes() == b"old"
    assert run_main("--docs", docs, "--output", out, "--replace") == 0
    assert shard_files(out) == {"fineweb_val_000000.bin": shard_bytes(doc(b"x"))}
    assert (out / "notes.txt").read_text() == "kept"


@pytest.mark.parametrize("lines, message", [
    ('{"text": "ok"}\n{"text": oops}\n', "line 2: not valid JSON"),
    ('{"text": "ok"}\n\n', "line 2: not valid JSON"),
    ('{"text": "ok"}\n{"text": "ok"}\n{"txt": "no"}\n', 'line 3: no string "text" field'),
    ('{"text": 5}\n', 'line 1: no string "text" field'),
    ('["text"]\n', 'line 1: no string "text" field'),
])
def test_malformed_jsonl_names_the_line_and_leaves_no_shards(tmp_path, capsys, lines, message):
    docs = tmp_path / "d.jsonl"
    docs.write_text(lines, encoding="utf-8")
    assert run_main("--docs", docs, "--output", tmp_path / "out", "--num-val-docs", 0, "--shard-size", 1) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: {docs}: {message}")
    assert shard_files(tmp_path / "out") == {}  # shards written before the bad line are removed again


def test_invalid_utf8_is_reported(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "\xff"}\n')
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "bad.txt").write_bytes(b"ok\xc3")
    assert run_main("--docs", tmp_path / "d.jsonl", "--output", tmp_path / "o1") == 2
    assert "d.jsonl: line 1: not valid JSON" in capsys.readouterr().err
    assert run_main("--text-dir", tmp_path / "texts", "--output", tmp_path / "o2") == 2
    assert capsys.readouterr().err.endswith("bad.txt: not valid UTF-8 at byte 2\n")


@pytest.mark.parametrize("args, message", [
    (["--shard-size", "0"], "error: --shard-size must be between 1 and 2147483647, got 0"),
    (["--shard-size", "-5"], "error: --shard-size must be between 1 and 2147483647, got -5"),
    (["--num-val-docs", "-1"], "error: --num-val-docs must be 0 or more, got -1"),
    (["--docs", "missing.jsonl"], "error: --docs missing.jsonl: no such file"),
    (["--text-dir", "missing"], "error: --text-dir missing: no such folder"),
])
def test_bad_arguments_write_nothing(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "d.jsonl", ["x"])
    argv = (["--docs", "d.jsonl"] if "--docs" not in args and "--text-dir" not in args else []) + args
    assert run_main(*argv, "--output", "out") == 2
    assert capsys.readouterr().err == message + "\n"
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "out").write_text("")
    assert run_main("--docs", write_jsonl(tmp_path / "d.jsonl", ["x"]), "--output", tmp_path / "out") == 2
    assert capsys.readouterr().err == f"error: --output {tmp_path / 'out'}: exists and is not a folder\n"


@pytest.mark.parametrize("make_args", [
    lambda tmp: ["--docs", tmp / "missing.jsonl"],
    lambda tmp: ["--docs", tmp / "bad.jsonl"],
    lambda tmp: ["--docs", write_jsonl(tmp / "d.jsonl", ["x"]), "--shard-size", 0],
])
def test_cli_errors_are_one_line_without_traceback(tmp_path, make_args):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    result = run_cli(*make_args(tmp_path), "--output", tmp_path / "out")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if "%" not in line] == [result.stderr.splitlines()[-1]]
    assert result.stderr.splitlines()[-1].startswith("error: ")  # only progress lines may come before it


def test_cli_success_reports_progress_and_summary(tmp_path):
    result = run_cli("--docs", write_jsonl(tmp_path / "d.jsonl", ["abc", "de"]), "--output", tmp_path / "out",
                     "--num-val-docs", 1)
    assert result.returncode == 0, result.stderr
    assert "100.0%" in result.stderr and "ETA" in result.stderr
    assert "val: 1 documents, 4 tokens, 1 shard(s)" in result.stdout
    assert "train: 1 documents, 3 tokens, 1 shard(s)" in result.stdout


def test_shards_load_with_the_training_loader(tmp_path):
    import train_gpt  # importable: data/prepare.py put the repository root on sys.path
    docs = write_jsonl(tmp_path / "d.jsonl", ["abcdef", "\u00e9", ""])
    assert run_main("--docs", docs, "--output", tmp_path / "out", "--num-val-docs", 0, "--shard-size", 5) == 0
    stream = doc(b"abcdef") + doc("\u00e9".encode()) + doc(b"")
    loaded = [list(train_gpt.load_data_shard(p)) for p in sorted((tmp_path / "out").glob("fineweb_train_*.bin"))]
    assert loaded == [stream[0:5], stream[5:10], stream[10:11]]


def test_fewer_documents_than_validation_size_warns(tmp_path, capsys):
    assert run_main("--docs", write_jsonl(tmp_path / "d.jsonl", ["x"]), "--output", tmp_path / "out") == 0
    assert "warning: only 1 documents, fewer than --num-val-docs 50,000" in capsys.readouterr().err


def fake_hub(monkeypatch, files: dict[str, Path], calls: list):
    def hf_hub_download(*, repo_id, filename, subfolder, repo_type):
        calls.append((repo_id, subfolder, filename, repo_type))
        return str(files[filename])
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))


def published_files(tmp_path, sha256=None) -> dict[str, Path]:
    docs = write_jsonl(tmp_path / "docs_selected.jsonl", ["v1", "v2", "t1"])
    manifest = tmp_path / "docs_selected.source_manifest.json"
    digest = sha256 or hashlib.sha256(docs.read_bytes()).hexdigest()
    manifest.write_text(json.dumps({"docs_sha256": digest, "docs_val": 2, "num_docs": 3}))
    return {docs.name: docs, manifest.name: manifest}


def test_download_checks_sha256_and_uses_manifest_val_count(tmp_path, monkeypatch):
    calls = []
    fake_hub(monkeypatch, published_files(tmp_path), calls)
    assert run_main("--output", tmp_path / "out") == 0
    assert calls == [
        ("willdepueoai/parameter-golf", "datasets", "docs_selected.source_manifest.json", "dataset"),
        ("willdepueoai/parameter-golf", "datasets", "docs_selected.jsonl", "dataset"),
    ]
    assert shard_files(tmp_path / "out") == {
        "fineweb_train_000000.bin": shard_bytes(doc(b"t1")),
        "fineweb_val_000000.bin": shard_bytes(doc(b"v1") + doc(b"v2")),
    }


def test_download_sha256_mismatch_is_an_error(tmp_path, monkeypatch, capsys):
    fake_hub(monkeypatch, published_files(tmp_path, sha256="0" * 64), [])
    assert run_main("--output", tmp_path / "out") == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"error: {tmp_path / 'docs_selected.jsonl'}: sha256 is ")
    assert err.endswith(f"but docs_selected.source_manifest.json says {'0' * 64}; delete the file and run again")
    assert not (tmp_path / "out").exists()


def test_download_failure_and_missing_hub_are_clear_errors(tmp_path, monkeypatch, capsys):
    def failing_download(**kwargs):
        raise OSError("network unreachable\nmore detail")
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=failing_download))
    assert run_main("--output", tmp_path / "out") == 2
    assert capsys.readouterr().err == ("error: cannot download datasets/docs_selected.source_manifest.json from "
                                       "willdepueoai/parameter-golf: network unreachable\n")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    assert run_main("--output", tmp_path / "out") == 2
    assert "error: downloading needs huggingface_hub" in capsys.readouterr().err
