#!/usr/bin/env python3
"""Write byte260 training/validation shards in the challenge's official format."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # the shard format lives in train_gpt.py, once
from train_gpt import PURE_BYTE_TOKENIZER, encode_document, write_shard  # noqa: E402

TOKENIZER_NAME = "fineweb_pure_byte_260.json"
DEFAULT_SHARD_DIR = REPO_ROOT / "data" / "datasets" / "fineweb10B_byte260"
DEFAULT_TOKENIZER_PATH = REPO_ROOT / "data" / "tokenizers" / TOKENIZER_NAME
HF_REPO_ID, HF_FOLDER = "willdepueoai/parameter-golf", "datasets"
DOCS_NAME, MANIFEST_NAME = "docs_selected.jsonl", "docs_selected.source_manifest.json"
SHARD_PATTERNS = ("fineweb_train_*.bin", "fineweb_val_*.bin")
NUM_VAL_DOCS, SHARD_SIZE, MAX_SHARD_SIZE = 50_000, 100_000_000, 2**31 - 1  # header count is an int32

DESCRIPTION = """\
Write byte260 shards (fineweb_val_NNNNNN.bin, then fineweb_train_NNNNNN.bin) in the
challenge's official format. Each document becomes BOS (id 1) followed by its UTF-8
bytes plus 4; characters UTF-8 cannot encode (lone surrogates) become '?'; no EOS.
The first --num-val-docs documents form the validation split, the rest training.
Documents are concatenated and cut into shards of exactly --shard-size tokens (the
last shard of a split may be shorter), so a document may continue into the next
shard; the two splits never share a shard."""

EPILOG = """\
sources:
  --docs FILE      JSON Lines: one object per line with a string "text" field
  --text-dir DIR   every file under DIR, subfolders and hidden files included, one
                   UTF-8 document per file, sorted by path relative to DIR
                   (Python string order, '/' as separator)
  neither          download datasets/docs_selected.jsonl and its manifest
                   datasets/docs_selected.source_manifest.json from the Hugging Face
                   dataset willdepueoai/parameter-golf into the Hugging Face cache
                   (needs huggingface_hub; set HF_HOME to move the cache), check the
                   file's sha256 against the manifest's docs_sha256, and take the
                   manifest's docs_val as the default --num-val-docs

output:
  without --output: shards in data/datasets/fineweb10B_byte260/ and the tokenizer
  description in data/tokenizers/fineweb_pure_byte_260.json (the official layout,
  relative to this repository); with --output DIR: shards and the tokenizer
  description both in DIR (DIR/fineweb_pure_byte_260.json), so DIR is self-contained.

Bad input stops with a one-line 'error: ...' and exit status 2."""


class PrepareError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class Progress:
    """Bytes-based progress line on stderr with rate and ETA, redrawn at most twice a second."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.start, self.last_draw = label, max(total, 1), time.monotonic(), 0.0
        self.interactive = sys.stderr.isatty()  # logs get a new line every 30 s instead of redraws

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last_draw < (0.5 if self.interactive else 30.0):
            return
        self.last_draw, elapsed = now, max(now - self.start, 1e-9)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else 0.0
        line = (f"{self.label}: {100 * done / self.total:5.1f}% {done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB"
                f" {rate / 1e6:,.1f} MB/s ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
        end = "\n" if final or not self.interactive else "\r"
        print(line, end=end, file=sys.stderr, flush=True)


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="data/prepare.py", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--docs", type=Path, metavar="FILE.jsonl", help="JSON Lines document file")
    source.add_argument("--text-dir", type=Path, metavar="DIR", help="folder of UTF-8 text files")
    parser.add_argument("--output", type=Path, metavar="DIR", help="folder for the shards (see output below)")
    parser.add_argument("--num-val-docs", type=int, metavar="N",
                        help=f"documents in the validation split (default {NUM_VAL_DOCS:,})")
    parser.add_argument("--shard-size", type=int, default=SHARD_SIZE, metavar="N",
                        help=f"tokens per shard (default {SHARD_SIZE:,})")
    parser.add_argument("--replace", action="store_true", help="delete existing fineweb_{train,val}_*.bin first")
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> None:
    if not 0 < args.shard_size <= MAX_SHARD_SIZE:
        raise PrepareError(f"--shard-size must be between 1 and {MAX_SHARD_SIZE}, got {args.shard_size}")
    if args.num_val_docs is not None and args.num_val_docs < 0:
        raise PrepareError(f"--num-val-docs must be 0 or more, got {args.num_val_docs}")
    if args.docs is not None and not args.docs.is_file():
        raise PrepareError(f"--docs {args.docs}: no such file")
    if args.text_dir is not None and not args.text_dir.is_dir():
        raise PrepareError(f"--text-dir {args.text_dir}: no such folder")
    if args.output is not None and args.output.exists() and not args.output.is_dir():
        raise PrepareError(f"--output {args.output}: exists and is not a folder")


def sha256_of_file(path: Path) -> str:
    digest, progress, done = hashlib.sha256(), Progress(f"checking sha256 of {path.name}", path.stat().st_size), 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            done += len(chunk)
            progress.update(done)
    progress.update(done, final=True)
    return digest.hexdigest()


def download_published_docs() -> tuple[Path, dict]:
    """Fetch the challenge's docs_selected.jsonl and its manifest; return the verified file and the manifest."""
    try:
        from huggingface_hub import hf_hub_download  # only this path needs it
    except ImportError:
        raise PrepareError("downloading needs huggingface_hub (pip install huggingface_hub), "
                           "or pass --docs or --text-dir") from None

    def fetch(name: str) -> Path:
        try:
            return Path(hf_hub_download(repo_id=HF_REPO_ID, filename=name, subfolder=HF_FOLDER, repo_type="dataset"))
        except Exception as exc:  # network and hub errors come in many types; all mean the same here
            raise PrepareError(f"cannot download {HF_FOLDER}/{name} from {HF_REPO_ID}: {first_line(exc)}") from None

    manifest_path = fetch(MANIFEST_NAME)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        expected = manifest["docs_sha256"]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise PrepareError(f"{manifest_path}: no readable docs_sha256 ({first_line(exc)})") from None
    docs_path = fetch(DOCS_NAME)
    actual = sha256_of_file(docs_path)
    if actual != expected:
        raise PrepareError(f"{docs_path}: sha256 is {actual} but {MANIFEST_NAME} says {expected}; "
                           "delete the file and run again")
    return docs_path, manifest


def jsonl_documents(path: Path, progress: Progress):
    """Yield the "text" of each line, streaming; utf-8 is decoded strictly, as the official exporter does."""
    done = 0
    with path.open("rb") as f:
        for line_number, line in enumerate(f, start=1):
            try:
                record = json.loads(line.decode("utf-8"))
            except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
                raise PrepareError(f"{path}: line {line_number}: not valid JSON ({first_line(exc)})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise PrepareError(f"{path}: line {line_number}: no string \"text\" field")
            done += len(line)
            progress.update(done)
            yield text
    progress.update(done, final=True)


def text_files(directory: Path) -> list[Path]:
    return sorted((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.relative_to(directory).as_posix())


def text_file_documents(files: list[Path], progress: Progress):
    done = 0
    for path in files:
        try:
            data = path.read_bytes()
            text = data.decode("utf-8")
        except OSError as exc:
            raise PrepareError(f"{path}: cannot read ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise PrepareError(f"{path}: not valid UTF-8 at byte {exc.start}") from None
        done += len(data)
        progress.update(done)
        yield text
    progress.update(done, final=True)


class ShardWriter:
    """Packs documents into shards of exactly shard_size tokens, as the official exporter does: a document
    continues into the next shard, and a change of split flushes the partial shard."""

    def __init__(self, shard_dir: Path, shard_size: int):
        self.shard_dir, self.buffer, self.fill, self.split = shard_dir, np.empty(shard_size, np.uint16), 0, "val"
        self.stats = {split: {"documents": 0, "tokens": 0, "shards": 0} for split in ("val", "train")}
        self.written: list[Path] = []

    def add(self, split: str, tokens: np.ndarray) -> None:
        if split != self.split:
            self.flush()
            self.split = split
        self.stats[split]["documents"] += 1
        self.stats[split]["tokens"] += len(tokens)
        pos = 0
        while pos < len(tokens):
            take = min(len(self.buffer) - self.fill, len(tokens) - pos)
            self.buffer[self.fill : self.fill + take] = tokens[pos : pos + take]
            self.fill, pos = self.fill + take, pos + take
            if self.fill == len(self.buffer):
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        path = self.shard_dir / f"fineweb_{self.split}_{self.stats[self.split]['shards']:06d}.bin"
        self.written.append(path)  # recorded first, so the cleanup also covers a write that failed
        write_shard(path, self.buffer[: self.fill])
        self.stats[self.split]["shards"] += 1
        self.fill = 0


def convert(documents, writer: ShardWriter, num_val_docs: int) -> None:
    try:
        for index, text in enumerate(documents):
            writer.add("val" if index < num_val_docs else "train", encode_document(text))
        writer.flush()
    except BaseException:
        for path in writer.written:  # never leave a partial split that looks complete
            path.unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> None:
    check_arguments(args)
    shard_dir = args.output if args.output is not None else DEFAULT_SHARD_DIR
    tokenizer_path = shard_dir / TOKENIZER_NAME if args.output is not None else DEFAULT_TOKENIZER_PATH
    old_shards = sorted(path for pattern in SHARD_PATTERNS for path in shard_dir.glob(pattern))
    if old_shards and not args.replace:
        raise PrepareError(f"{shard_dir} already holds {len(old_shards)} shard(s); pass --replace to overwrite them")
    num_val_docs = args.num_val_docs
    if args.text_dir is not None:
        files = text_files(args.text_dir)
        documents = text_file_documents(files, Progress("reading", sum(p.stat().st_size for p in files)))
    else:
        docs_path, manifest = (args.docs, {}) if args.docs is not None else download_published_docs()
        if num_val_docs is None and isinstance(manifest.get("docs_val"), int):
            num_val_docs = manifest["docs_val"]  # the official exporter's default
        documents = jsonl_documents(docs_path, Progress("converting", docs_path.stat().st_size))
    num_val_docs = NUM_VAL_DOCS if num_val_docs is None else num_val_docs
    try:
        for path in old_shards:
            path.unlink()
        shard_dir.mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(shard_dir, args.shard_size)
        convert(documents, writer, num_val_docs)
        tokenizer_path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer_path.write_text(json.dumps(PURE_BYTE_TOKENIZER, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except OSError as exc:
        raise PrepareError(f"{exc.filename or shard_dir}: {exc.strerror or first_line(exc)}") from None
    print_summary(writer.stats, num_val_docs, shard_dir, tokenizer_path)


def print_summary(stats: dict, num_val_docs: int, shard_dir: Path, tokenizer_path: Path) -> None:
    for split in ("val", "train"):
        s = stats[split]
        print(f"{split:>5}: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['shards']} shard(s)")
    print(f"shards in {shard_dir}, tokenizer description in {tokenizer_path}")
    if stats["val"]["documents"] < num_val_docs:
        print(f"warning: only {stats['val']['documents']:,} documents, fewer than --num-val-docs {num_val_docs:,}; "
              "the training split is empty", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
