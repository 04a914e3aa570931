"""The CPU proxies from a bare clone: tools/text_corpus.py turns public text files into documents, data/prepare.py
writes the shards, and tools/proxy.sh runs a proxy configuration on them (README, "CPU proxies")."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, generated_documents

sys.path.insert(0, str(ROOT / "tools"))
import text_corpus  # noqa: E402


def write_sources(root):
    """A folder like a documentation package's: text, a page, a fortune file, a binary index, a link, a style."""
    docs = generated_documents(60, seed=3)
    (root / "pages").mkdir(parents=True)
    for i, doc in enumerate(docs[:40]):
        (root / f"doc{i:02d}.txt").write_text(doc + "\n")
    (root / "pages" / "page.html").write_text(
        "<html><head><style>p {color: red}</style><script>var x = 1;</script></head><body><h1>Title</h1>"
        "<p>First &amp; second.</p><p>Caf\u00e9 <b>bold</b> text.</p></body></html>")
    (root / "fortunes").write_text("\n%\n".join(docs[40:]) + "\n%\n")
    (root / "fortunes.dat").write_bytes(b"\x00\x00\x00\x02" + bytes(range(256)))
    (root / "fortunes.u8").symlink_to(root / "fortunes")
    (root / "pages" / "style.css").write_text("body { margin: 0 }\n")
    return docs


def test_text_corpus_reads_text_pages_and_fortunes_and_skips_the_rest(tmp_path, capsys):
    docs = write_sources(tmp_path / "src")
    out = tmp_path / "docs.jsonl"
    assert text_corpus.main([str(out), str(tmp_path / "src"), "--seed", "1"]) == 0
    got = [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()]
    page = "Title\nFirst & second.\nCaf\u00e9 bold text."
    assert sorted(got) == sorted(docs[:40] + docs[40:] + [page])  # one document per fortune; no link, index, style
    assert got != sorted(got, key=lambda d: d in docs[40:])  # shuffled: the sources are mixed
    again = tmp_path / "again.jsonl"
    text_corpus.main([str(again), str(tmp_path / "src"), "--seed", "1"])
    assert again.read_text() == out.read_text()  # the seed fixes the order
    assert "61 documents" in capsys.readouterr().out


def test_text_corpus_bad_source_is_one_line(tmp_path, capsys):
    assert text_corpus.main([str(tmp_path / "o.jsonl"), str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0] == f"error: {tmp_path / 'nowhere'}: no such file or folder"
    (tmp_path / "empty").mkdir()
    assert text_corpus.main([str(tmp_path / "o.jsonl"), str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'empty'}: no text found")
    (tmp_path / "empty" / "a.txt").write_text("some text")
    out = tmp_path / "no such folder" / "o.jsonl"
    assert text_corpus.main([str(out), str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err == f"error: {out}: cannot write (No such file or directory)\n"


def test_proxy_runs_its_configuration_on_a_corpus_built_from_text(tmp_path):
    """The README's recipe end to end, shortened to 1 step: the log holds the proxy's configuration."""
    write_sources(tmp_path / "src")
    subprocess.run([sys.executable, str(ROOT / "tools" / "text_corpus.py"), str(tmp_path / "d.jsonl"),
                    str(tmp_path / "src")], check=True, capture_output=True)
    subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), "--docs", str(tmp_path / "d.jsonl"),
                    "--num-val-docs", "12", "--output", str(tmp_path / "corpus")], check=True, capture_output=True)
    (tmp_path / "train_gpt.py").symlink_to(ROOT / "train_gpt.py")  # a project root whose logs/ is the test's own
    overrides = ["ITERATIONS=1", "TTT_ENABLED=0", "PREQUANT_EVAL=0", "GPTQ_CALIB_BATCHES=1"]
    proc = subprocess.run(["bash", str(ROOT / "tools" / "proxy.sh"), "short", str(tmp_path / "corpus"), *overrides],
                          cwd=tmp_path, env=dict(os.environ, RUN_ID="proxy_test"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (tmp_path / "logs" / "proxy_test.txt").read_text()
    for knob in ("model_dim=128", "train_seq_len=511", "train_batch_tokens=16352", "iterations=1",
                 "ema_decay=0.98", "gptq_calib_batches=1"):
        assert f"hparam {knob}\n" in log, knob
    assert re.search(r"^final_int6_lzma_roundtrip_exact val_loss:\S+ val_bpb:\S+$", proc.stdout, re.M), proc.stdout
    assert proc.stdout.startswith("proxy run proxy_test finished in")
    assert "_breakdown " not in proc.stdout and "final_int6_lzma_roundtrip_breakdown " in log  # kept in the log only


@pytest.mark.parametrize("argv, message", [([], "usage: tools/proxy.sh"), (["medium", "."], "usage: tools/proxy.sh"),
                                           (["short", "/nowhere"], "error: CORPUS_DIR=/nowhere: no such folder")])
def test_proxy_bad_arguments_are_one_line(argv, message):
    proc = subprocess.run(["bash", str(ROOT / "tools" / "proxy.sh"), *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.startswith(message) and len(proc.stderr.splitlines()) == 1

