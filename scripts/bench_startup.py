"""Start-up time of `unialign-sample` and `unialign-train` with a cold and a warm persistent
compilation cache, on a finished quickstart work dir.

Each run is a fresh process, as a restart is. Per repeat: the cache folder is emptied, the
command runs once (cold: compiles and fills the cache) and once more (warm: loads the
compiled programs). Sampling writes one 32 px image from the quickstart's pipeline folder;
training runs 2 steps of the quickstart config from scratch on the quickstart's data. Wall
time of the whole command is reported (imports, loading, compiling and the work itself).

    python scripts/bench_startup.py --workdir runs/quickstart --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def sample_command(workdir: str, out: str) -> list[str]:
    return [sys.executable, "-m", "unialign_jax.sampling.cli", "t2i", "--ckpt",
            os.path.join(workdir, "pipeline"), "--prompt", "a red circle", "--height", "32",
            "--width", "32", "--steps", "8", "--no-progress", "--overwrite", "--out", out]


def train_command(workdir: str, out: str) -> list[str]:
    """The quickstart's training on its own data, 2 steps, into a fresh folder."""
    from unialign_jax.runs.work_dir import read_run_config

    run = read_run_config(os.path.join(workdir, "train"))
    overrides = [f"models.tokenizer={run.models.tokenizer}",
                 f"models.vae_path={run.models.vae_path}",
                 f"data.tasks={run.data.tasks!r}",
                 "run.num_steps=2", "run.progress_bar=False", "run.tensorboard=False"]
    shutil.rmtree(out, ignore_errors=True)
    return [sys.executable, "-m", "unialign_jax.training.cli", "--config", "quickstart",
            "--workdir", out, *overrides]


def timed(command: list[str], cache: str) -> float:
    env = dict(os.environ, UNIALIGN_JAX_COMPILATION_CACHE=cache)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(command[:4])} … failed:\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a finished unialign-quickstart work dir")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if not os.path.isdir(os.path.join(args.workdir, "pipeline")):
        sys.exit(f"{args.workdir} has no pipeline folder: run unialign-quickstart first")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache, out = os.path.join(tmp, "cache"), os.path.join(tmp, "out")
        for name, command in (("unialign-sample", sample_command),
                              ("unialign-train", train_command)):
            cold, warm = [], []
            for _ in range(args.repeats):
                shutil.rmtree(cache, ignore_errors=True)
                cold.append(timed(command(args.workdir, out), cache))
                warm.append(timed(command(args.workdir, out), cache))
            results[name] = {"cold_s": cold, "warm_s": warm}
            print(f"{name}: cold {statistics.median(cold):.1f} s "
                  f"({min(cold):.1f}–{max(cold):.1f}), warm {statistics.median(warm):.1f} s "
                  f"({min(warm):.1f}–{max(warm):.1f}), {args.repeats} repeats", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
