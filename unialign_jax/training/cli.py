"""`unialign-train --config NAME|FILE --workdir DIR [section.key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import unialign_configs
from unialign_jax import compilation_cache, configlib, files
from unialign_jax.runs.config import TrainConfig

LOSS_CURVES_FILE = "loss_curves.png"  # drawn from metrics.jsonl whenever a run stops
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: "checkpointed, rerun me"
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: Ctrl-C
ERROR_EXIT_CODE = 2        # a clear error (bad config, damaged data, full disk, ...)

EPILOG = """\
examples:
  unialign-quickstart                      # builds data, trains a tiny model on CPU, reports
  unialign-train --config unialignment_512 --workdir gs://BUCKET/run \\
      models.pipeline=/models/unialign_jax_sd3 \\
      data.t2i_shards="('/data/t2i',)" data.edit_shards="('/data/edit',)"
  # after `unialign-quickstart --workdir runs/quickstart`: more of it, on its data
  unialign-train --config quickstart --workdir runs/more run.num_steps=50 optimizer.lr=1e-3 \\
      models.tokenizer=runs/quickstart/data/tokenizer models.vae_path=runs/quickstart/vae \\
      data.tasks="{{'t2i': ('runs/quickstart/data/shards/t2i',)}}"

--config takes the name of a shipped config ({configs}) or a .py file whose get_config()
returns a TrainConfig. Rerunning the same command resumes from the latest checkpoint in
--workdir (parameters, optimizer, EMA, PRNG and data position), bit for bit, also after a
SIGKILL or a crash mid-save; a damaged latest checkpoint is skipped with a warning
(run.resume). On SIGTERM the current step finishes, a checkpoint is written and the
process exits with code 143; Ctrl-C (SIGINT) does the same and exits with code 130 (a
second Ctrl-C stops at once, without saving); clear errors (bad config, damaged data, full disk,
run.max_nonfinite_steps non-finite steps in a row, a dead host) exit with code 2.

config keys (override with key=value; values are Python literals, else strings; a dict
sets several fields of a section, e.g. models.transformer="{{'num_layers': 2}}"):
"""


def build_parser() -> argparse.ArgumentParser:
    keys = "\n".join(f"  {line}" for line in configlib.describe(TrainConfig()))
    parser = argparse.ArgumentParser(
        prog="unialign-train",
        description="Train UniAlignment (image flow matching + caption masked diffusion + "
                    "contrastive + alignment losses) on a device mesh, with checkpoints, "
                    "automatic resume and metrics (stdout, WORKDIR/metrics.jsonl, "
                    "WORKDIR/tensorboard).",
        epilog=EPILOG.format(configs=", ".join(unialign_configs.names())) + keys,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, metavar="NAME|FILE",
                        help="a shipped config's name or a Python file with get_config()")
    parser.add_argument("--workdir", required=True, metavar="DIR",
                        help="checkpoints, metrics and config.json (local or gs://)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. optimizer.lr=1e-4 run.num_steps=1000")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every key, its type and value) and "
                             "exit")
    compilation_cache.add_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save chatter
    # JAX's backend discovery: "Unable to initialize backend 'tpu'" on every non-TPU host
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    try:
        cfg = configlib.apply_overrides(unialign_configs.load(args.config), args.overrides)
        if args.print_config:
            print("\n".join(configlib.describe(cfg)))
            return 0
        cfg.validate()
        compilation_cache.setup_from_args(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        return _error(e)
    from unialign_jax.apps.validation import validation_of
    import jax

    from unialign_jax.training import trainer
    from unialign_jax.training.metrics import METRICS_FILE, plot_losses

    try:
        result = trainer.train(cfg, args.workdir, validation=validation_of(cfg, args.workdir))
    except KeyboardInterrupt:
        print("unialign-train: interrupted before a checkpoint could be written; rerun the "
              "same command to resume from the last one", file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    except trainer.HostFailure as e:
        # jax.distributed's shutdown would wait for the dead process: leave at once.
        _error(e)
        os._exit(ERROR_EXIT_CODE)
    except (ValueError, FileNotFoundError, FileExistsError, *trainer.RUN_STOPS) as e:
        return _error(e)
    except OSError as e:
        if not files.is_disk_full(e):
            raise
        return _error(files.disk_full_message(args.workdir))
    if jax.process_index() == 0:
        plot_losses(os.path.join(args.workdir, METRICS_FILE),
                    os.path.join(args.workdir, LOSS_CURVES_FILE))
    if not result.preempted:
        return 0
    return INTERRUPTED_EXIT_CODE if result.stop_signal == signal.SIGINT else PREEMPTED_EXIT_CODE


def _error(message) -> int:
    print(f"unialign-train: error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    return ERROR_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
