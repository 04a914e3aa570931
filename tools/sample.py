"""Generates text from a saved artifact: what did the model learn?

    python3 tools/sample.py final_model.int6.ptz --log logs/RUN_ID.txt --prompt "The " --bytes 300 --seed 1

The artifact is read through train_gpt.load_artifact, so the model must be configured as it was trained: with
--log, from the `hparam` lines of that run's log; otherwise from the environment, as EVAL_ONLY does.

Each byte is drawn from the model's next-token distribution given the document so far (BOS, the prompt's UTF-8 bytes,
the bytes drawn before it), restricted to the 256 byte ids (the end of a document, BOS, is never drawn), divided by
--temperature (0: the most likely byte) and cut to the --top-k most likely bytes (0: all). The context is what the
model scores with: the last TRAIN_SEQ_LEN tokens, a window patched from its own first byte, as in training.
The same artifact, knobs, device and --seed give the same bytes.

Writes the prompt and the drawn bytes, as raw bytes, to stdout, and the speed to stderr. A missing, damaged or foreign
artifact, a log without knobs or knobs that do not fit the artifact: one `error:` line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402
from summarize import PATTERNS, SEPARATOR  # noqa: E402

# Knobs of the log that name or place the run rather than the model: this process chooses its own.
NOT_MODEL = {"run_id", "eval_only", "device", "world_size"}


def knobs_from_log(path: Path) -> dict[str, str]:
    """The environment the logged run had, from its `hparam` lines (the last run in the file; None is `auto`)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise train_gpt.ConfigError(f"--log {path}: cannot read it as a text log ({e.__class__.__name__})") from None
    if SEPARATOR in lines:
        lines = lines[len(lines) - lines[::-1].index(SEPARATOR):]
    knobs = {m[1].upper(): "auto" if m[2] == "None" else m[2]
             for m in map(PATTERNS["hparam"].match, lines) if m and m[1] not in NOT_MODEL}
    if not knobs:
        raise train_gpt.ConfigError(f"--log {path}: no `hparam` lines; expected the log of the train_gpt.py run "
                                    f"that wrote the artifact")
    return knobs


def load(path: Path, device: torch.device) -> tuple[train_gpt.ByteJEPA, train_gpt.Hyperparameters]:
    """The artifact's model in evaluation mode on `device`, configured from the environment."""
    args = train_gpt.Hyperparameters()
    train_gpt.read_artifact(path, where=str(path))  # a damaged or foreign file: one line naming it
    return train_gpt.load_artifact(path, args).to(device).eval(), args


def next_byte_logits(model: train_gpt.ByteJEPA, context: list[int], window: int) -> torch.Tensor:
    """Logits (256) of the byte after `context` (token ids), from one window holding its last window-1 tokens and
    then a placeholder for the byte: causality keeps later positions out of it, and one shape serves every step."""
    context = context[-(window - 1):]
    ids = torch.tensor(context + [0] * (window - len(context)), device=next(model.parameters()).device)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=ids.is_cuda):
        return model.forward_logits(ids[None])[0, len(context), train_gpt.BYTE_OFFSET:].float()


def draw(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> int:
    """A byte from softmax(logits / temperature) over the top_k largest logits (0: all); temperature 0: argmax."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], -torch.inf)
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def generate(model: train_gpt.ByteJEPA, args: train_gpt.Hyperparameters, prompt: bytes, count: int,
             temperature: float, top_k: int, seed: int) -> bytes:
    """`count` bytes following BOS + prompt, each drawn given all before it (within the model's window)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    context = [train_gpt.BOS_ID] + [b + train_gpt.BYTE_OFFSET for b in prompt]
    out = bytearray()
    for _ in range(count):
        out.append(draw(next_byte_logits(model, context, args.window), temperature, top_k, generator))
        context.append(out[-1] + train_gpt.BYTE_OFFSET)
    return bytes(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("artifact", type=Path, help="a final_model.int6.ptz written by train_gpt.py")
    p.add_argument("--log", type=Path, help="the run's log: the model knobs come from its hparam lines")
    p.add_argument("--prompt", default="", help="text the document starts with (UTF-8)")
    p.add_argument("--bytes", type=int, default=256, help="bytes to generate (default 256)")
    p.add_argument("--temperature", type=float, default=1.0, help="divides the logits; 0 = greedy (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="draw among the K most likely bytes; 0 = all (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA if available")
    a = p.parse_args(argv)
    for name, value in (("--bytes", a.bytes), ("--temperature", a.temperature), ("--top-k", a.top_k)):
        if value < 0:
            p.error(f"{name} must not be negative")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    device = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    try:
        if a.log:
            os.environ.update(knobs_from_log(a.log))
        model, args = load(a.artifact, device)
    except train_gpt.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = time.perf_counter()
    text = generate(model, args, a.prompt.encode("utf-8"), a.bytes, a.temperature, a.top_k, a.seed)
    seconds = time.perf_counter() - t
    sys.stdout.buffer.write(a.prompt.encode("utf-8") + text + b"\n")
    sys.stdout.flush()
    print(f"sample: {len(text)} bytes in {seconds:.2f}s ({len(text) / max(seconds, 1e-9):.1f} bytes/s) on {device}, "
          f"window {args.window}, temperature {a.temperature}, top-k {a.top_k}, seed {a.seed}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
