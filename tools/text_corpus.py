#!/usr/bin/env python3
"""Public text files -> one shuffled JSON Lines file of documents, for `data/prepare.py --docs`: how to build a
corpus like the one behind the README's CPU proxies (Debian's documentation packages) from a bare clone.

    tools/text_corpus.py OUT.jsonl SOURCE [SOURCE ...] [--seed 0]

Every file under each SOURCE (a file or a folder) that is UTF-8 text is read; symbolic links, binary files (a NUL
byte, or not UTF-8: images, indexes) and style, script and vector-image files are skipped. .html and .htm files are
reduced to their text; a file made of entries between lines holding only '%' (a fortune file) gives one document
per entry. Empty documents are dropped, and the documents are shuffled with --seed, so that the validation split
(the first --num-val-docs documents) draws on every source.
Bad input is one `error: ...` line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from html.parser import HTMLParser
from pathlib import Path


class TextOfHtml(HTMLParser):
    """The text of a page, without scripts and styles; block elements end lines."""
    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "section", "dt", "dd"}

    def __init__(self):
        super().__init__()
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("script", "style")
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        self.skip -= tag in ("script", "style") and self.skip > 0

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_text(page: str) -> str:
    parser = TextOfHtml()
    parser.feed(page)
    return re.sub(r"\n\s*\n+", "\n\n", "".join(parser.parts)).strip()


SKIPPED_SUFFIXES = {".css", ".js", ".svg", ".xpm"}


def documents_of(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return []
    if "\0" in text or path.suffix in SKIPPED_SUFFIXES:
        return []
    if path.suffix in (".html", ".htm"):
        return [html_text(text)]
    if re.search(r"^%$", text, flags=re.M):  # a fortune file: entries between '%' lines
        return [entry.strip() for entry in re.split(r"^%$", text, flags=re.M)]
    return [text.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the JSON Lines file to write")
    parser.add_argument("sources", type=Path, nargs="+", help="files or folders of text, HTML or fortune files")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    args = parser.parse_args(argv)
    files = []
    for source in args.sources:
        if not source.exists():
            print(f"error: {source}: no such file or folder", file=sys.stderr)
            return 2
        found = sorted(source.rglob("*")) if source.is_dir() else [source]
        files += [p for p in found if p.is_file() and not p.is_symlink()]
    docs = [doc for path in files for doc in documents_of(path) if doc]
    if not docs:
        print(f"error: {', '.join(map(str, args.sources))}: no text found", file=sys.stderr)
        return 2
    random.Random(args.seed).shuffle(docs)
    try:
        with open(args.out, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    except OSError as e:
        print(f"error: {args.out}: cannot write ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(docs)} documents, {sum(len(d.encode()) for d in docs):,} bytes from {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
