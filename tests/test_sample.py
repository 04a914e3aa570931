"""tools/sample.py: each byte drawn from the model's distribution given the bytes before it (replayed against one
full forward pass), reproducible by seed, cropped to the model's window; a trained model's samples score better than
random bytes; knobs from the run's log; a damaged artifact is one line and exit 2."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt
from conftest import ROOT, randomize, tiny_env

sys.path.insert(0, str(ROOT / "tools"))
import sample  # noqa: E402

TOOL = ROOT / "tools" / "sample.py"


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """20 steps of the tiny model on the generated corpus, as an artifact (round-to-nearest), and the log header of
    its knobs; the environment's tiny knobs are restored afterwards."""
    folder = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in tiny_env(corpus, ITERATIONS=20, TTT_ENABLED=0, PREQUANT_EVAL=0, QUANT="rtn").items():
            mp.setenv(k, v)
        args = train_gpt.Hyperparameters()
        rt = train_gpt.Runtime(args)
        model = train_gpt.build_model(args)
        train_gpt.Trainer(args, rt, model, train_gpt.load_validation_tokens(args), lambda *a, **k: None).run()
        (folder / "model.ptz").write_bytes(train_gpt.build_artifact(model.state_dict(), args, log=lambda m: None))
        header = []
        train_gpt.log_run_header(args, rt, lambda msg, console=True: header.append(msg))
        (folder / "run.txt").write_text("\n".join(header) + "\n")
    return folder


@pytest.fixture
def tiny_model(tiny_args):
    args = tiny_args()
    return randomize(train_gpt.build_model(args), seed=1, std=0.2).eval(), args


def reference_draws(model, sequence: list[int], start: int, temperature: float, top_k: int, seed: int) -> list[int]:
    """The bytes at positions start.. of `sequence` (ids, shorter than the window) as the sampler must draw them:
    logits of one forward pass over the whole sequence (position i sees ids < i only), the byte ids' softmax at the
    temperature over the top-k, one multinomial draw each from a generator seeded once."""
    with torch.no_grad():
        logits = model.forward_logits(torch.tensor(sequence + [0] * (64 - len(sequence)))[None])[0]
    g, drawn = torch.Generator().manual_seed(seed), []
    for i in range(start, len(sequence)):
        z = logits[i, train_gpt.BYTE_OFFSET:]
        if temperature == 0:
            drawn.append(int(z.argmax()))
            continue
        z = z / temperature
        if top_k:
            z = torch.where(z >= torch.sort(z, descending=True).values[top_k - 1], z, -torch.inf)
        drawn.append(int(torch.multinomial(torch.softmax(z, -1), 1, generator=g)))
    return drawn


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5), (0.0, 0), (1.0, 1)])
def test_each_byte_is_drawn_from_the_model_given_the_bytes_before_it(tiny_model, temperature, top_k):
    model, args = tiny_model
    prompt = b"The cat "
    text = sample.generate(model, args, prompt, 50, temperature, top_k, seed=3)
    sequence = [train_gpt.BOS_ID] + [b + 4 for b in prompt + text]
    assert len(text) == 50 and len(sequence) < args.window
    assert list(text) == reference_draws(model, sequence, 1 + len(prompt), temperature, top_k, seed=3)
    if top_k == 1:  # the most likely byte, every time: greedy
        assert text == sample.generate(model, args, prompt, 50, 0.0, 0, seed=9)


def test_same_seed_same_bytes_other_seed_other_bytes(tiny_model):
    model, args = tiny_model
    a, b, c = (sample.generate(model, args, b"A", 100, 1.0, 0, seed) for seed in (5, 5, 6))
    assert a == b and a != c


def test_the_context_is_the_model_window_s_last_bytes(tiny_model):
    """Past the window (64 bytes here) only the last 63 tokens count: prompts that differ before them (BOS
    included) give the same continuation; a change inside them changes it."""
    model, args = tiny_model
    tail = bytes(range(97, 97 + 20)) * 3 + b"xyz"  # 63 bytes
    runs = [sample.generate(model, args, head + tail, 80, 1.0, 0, seed=2) for head in (b"", b"Q" * 10, b"zz" * 40)]
    assert runs[0] == runs[1] == runs[2]
    logits = [sample.next_byte_logits(model, [train_gpt.BOS_ID] + [b + 4 for b in prompt], args.window)
              for prompt in (b"Q" + tail, b"R" + tail, b"Q!" + tail[1:])]
    assert torch.equal(logits[0], logits[1]) and not torch.allclose(logits[0], logits[2])


def bpb(model, args, text: bytes) -> float:
    tokens = np.array([train_gpt.BOS_ID] + [b + 4 for b in text], dtype=np.uint16)
    return train_gpt.evaluate_standard(model, tokens, args, train_gpt.Runtime(args)).bpb


def test_a_trained_model_s_samples_score_better_than_random_bytes(trained, monkeypatch, capsysbinary):
    """Through main, knobs from the log alone (the environment's tiny knobs removed): at temperature 1 the samples
    score far fewer bits per byte under the model than uniform random bytes do."""
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()  # main sets the log's knobs here
                                        if k.lower() not in vars(train_gpt.Hyperparameters())})
    assert sample.main([str(trained / "model.ptz"), "--log", str(trained / "run.txt"), "--bytes", "300",
                        "--seed", "1", "--device", "cpu"]) == 0
    text = capsysbinary.readouterr().out[:-1]
    model, args = sample.load(trained / "model.ptz", torch.device("cpu"))
    noise = np.random.default_rng(0).integers(0, 256, size=300, dtype=np.uint8).tobytes()
    sampled, random_bytes = bpb(model, args, text), bpb(model, args, noise)
    assert len(text) == 300 and sampled < 0.6 * random_bytes, (sampled, random_bytes, text)


def test_a_1_byte_artifact_is_one_line_and_exit_2(tmp_path):
    """The command line, as a user runs it: one `error:` line naming the file, exit 2, no traceback, no output."""
    path = tmp_path / "model.ptz"
    path.write_bytes(b"\x00")
    proc = subprocess.run([sys.executable, str(TOOL), str(path)], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path}: not an xz"), proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("content,reason", [(b"", "the artifact file is empty"), (None, "cannot read the artifact"),
                                            (b"not a log", "no `hparam` lines")], ids=["empty", "missing", "bad-log"])
def test_a_damaged_or_missing_input_is_one_line_and_exit_2(tmp_path, capsys, content, reason):
    path, log = tmp_path / "model.ptz", []
    if reason == "no `hparam` lines":
        path, log = ROOT / "README.md", ["--log", str(tmp_path / "run.txt")]  # the log is read first
        (tmp_path / "run.txt").write_bytes(content)
    elif content is not None:
        path.write_bytes(content)
    assert sample.main([str(path), *log]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and reason in err[0], err


def test_knobs_that_do_not_fit_the_artifact_are_one_line(trained, monkeypatch, capsys):
    monkeypatch.setenv("MODEL_DIM", "48")
    assert sample.main([str(trained / "model.ptz"), "--bytes", "4"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "does not match the model configured here" in err[0], err


def test_knobs_come_from_the_last_run_of_a_reused_log(tmp_path):
    """A log a reused RUN_ID appended a second run to: the knobs are the last run's (its source, the separator, its
    hparam lines), `None` reads as auto, and the knobs that name or place the run are left to this process."""
    first = ["import torch  # the first run's source", sample.SEPARATOR, "hparam model_dim=48", "hparam seed=1",
             "step:1/2 train_loss:5.5"]
    second = ["import torch  # the second run's source", "hparam model_dim=999  (a line of the source)",
              sample.SEPARATOR, "hparam model_dim=32", "hparam decoder_dim=None", "hparam run_id=again",
              "hparam device=cpu", "hparam world_size=2", "hparam eval_only=", "step:1/2 train_loss:5.4"]
    log = tmp_path / "run.txt"
    log.write_text("\n".join(first + second) + "\n")
    assert sample.knobs_from_log(log) == {"MODEL_DIM": "32", "DECODER_DIM": "auto"}
    log.write_text("\n".join(first) + "\n")
    assert sample.knobs_from_log(log) == {"MODEL_DIM": "48", "SEED": "1"}
