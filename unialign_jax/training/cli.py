"""`unialign-train --config configs/NAME.py --workdir DIR [key=value ...]`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from unialign_jax.training.config import TrainConfig, apply_overrides, load_config

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: "checkpointed, rerun me"

EPILOG = """\
examples:
  unialign-quickstart                      # builds data, trains a tiny model on CPU, reports
  unialign-train --config configs/unialignment_512.py --workdir gs://BUCKET/run \\
      pipeline=/models/unialign_jax_sd3 t2i_shards="('/data/t2i',)" edit_shards="('/data/edit',)"
  unialign-train --config configs/quickstart.py --workdir /tmp/qs num_steps=50 lr=1e-3

Rerunning the same command resumes from the latest checkpoint in --workdir (parameters,
optimizer, EMA, PRNG and data position). On SIGTERM the current step finishes, a
checkpoint is written and the process exits with code 143.

config keys (override with key=value; values are Python literals, else strings):
"""


def _keys_help() -> str:
    defaults = TrainConfig()
    return "\n".join(f"  {f.name} = {getattr(defaults, f.name)!r}"
                     for f in dataclasses.fields(TrainConfig))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unialign-train",
        description="Train UniAlignment (image flow matching + caption masked diffusion + "
                    "contrastive + alignment losses) on a device mesh, with checkpoints, "
                    "automatic resume and metrics (stdout, WORKDIR/metrics.jsonl, "
                    "WORKDIR/tensorboard).",
        epilog=EPILOG + _keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, metavar="FILE",
                        help="Python file with get_config() -> TrainConfig (see configs/)")
    parser.add_argument("--workdir", required=True, metavar="DIR",
                        help="checkpoints, metrics and config.json (local or gs://)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. lr=1e-4 num_steps=1000")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save chatter
    try:
        cfg = apply_overrides(load_config(args.config), args.overrides)
        if args.print_config:
            for k, v in cfg.to_dict().items():
                print(f"{k} = {v!r}")
            return 0
        cfg.validate()
        from unialign_jax.training.trainer import train

        result = train(cfg, args.workdir)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"unialign-train: error: {e}", file=sys.stderr)
        return 2
    return PREEMPTED_EXIT_CODE if result.preempted else 0


if __name__ == "__main__":
    sys.exit(main())
