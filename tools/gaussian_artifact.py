"""Does the default model fit the cap whatever its weights? Fills every parameter of the model the environment
configures (the full-size default without overrides) with Gaussian values (std 0.02: every int6 level used, the
hardest case for LZMA), runs the export path (`build_artifact`, with its rate control) and logs each step.

    python3 tools/gaussian_artifact.py [RUN_ID]       ->  logs/<RUN_ID>.txt (default: gaussian_artifact)
"""
import argparse
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DEVICE", "cpu")
import train_gpt  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_id", nargs="?", default="gaussian_artifact", help="the log's name: logs/<RUN_ID>.txt")
    run_id = parser.parse_args(argv).run_id
    (ROOT / "logs").mkdir(exist_ok=True)
    with open(ROOT / "logs" / f"{run_id}.txt", "w") as out:
        def log(line: str):
            print(line)
            print(line, file=out, flush=True)
        args = train_gpt.Hyperparameters()
        model = train_gpt.build_model(args)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        stored = sum(p.numel() for n, p in model.named_parameters()
                     if not n.startswith(train_gpt.TRAINING_ONLY_PREFIXES))
        log(f"machine: {platform.machine()} {platform.processor() or ''} torch {torch.__version__}; model_params:"
            f"{sum(p.numel() for p in model.parameters())} (stored: {stored}); Gaussian weights, std 0.02, seed 0")
        try:
            blob = train_gpt.build_artifact(model.state_dict(), args, log=log)
        except train_gpt.SizeCapExceeded:
            log(f"OVER the cap {args.size_cap_bytes} even with every matrix at int4")
            return 3
        code = len((ROOT / "train_gpt.py").read_bytes())
        log(f"artifact {len(blob)} bytes + code {code} bytes = {len(blob) + code} (cap {args.size_cap_bytes}): fits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
