"""Train-step throughput: samples/s, model TFLOP/s and MFU of the full UniAlignment step.

Builds the real train step (`training.step.make_train_step`: transformer + frozen T5 + VAE,
all four loss families, AdamW) with random weights on whatever backend is present, times it
on t2i and/or edit batches and prints samples/s, model TFLOP/s (the analytical count of
`unialign_jax.training.flops`, recomputation not counted) and MFU against the chip's bf16
peak. With --torch (the default on CPU) it first times a PyTorch reference step written the
release's way — diffusers' joint blocks with the UniAlignment heads, transformers' T5,
diffusers' VAE, the same losses in eager mode, AdamW — on the same sizes and threads, and
prints the ratio.

    python scripts/bench_train.py --preset tiny                   # CPU, seconds
    python scripts/bench_train.py --preset small --repeats 5      # CPU, vs PyTorch
    python scripts/bench_train.py --preset full --dtype bfloat16 --micro-batch 8 \\
        --remat nothing_saveable --task t2i edit --no-torch      # one H100 / H200 / TPU chip
    python scripts/bench_train.py --preset small --no-torch --micro-batch 1 4 \\
        --remat none nothing_saveable dots_saveable save_attention save_qkv_attention

Several --remat / --micro-batch values give one row each (the remat × micro-batch table):
samples/s and XLA's temporaries of the compiled step (plus the allocator's peak on
accelerators).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

PRESETS = {
    # transformer (layers, heads, head_dim), T5 (layers, d_model, heads, d_ff), VAE channels
    "tiny": ((2, 2, 32), (2, 64, 2, 128), (16, 32, 32, 32)),
    "small": ((4, 4, 64), (4, 512, 8, 1024), (32, 64, 128, 128)),
    "full": ((24, 24, 64), (24, 4096, 64, 10240), (128, 256, 512, 512)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--resolution", type=int, default=None,
                   help="pixels (default: 64 tiny, 256 small, 512 full)")
    p.add_argument("--text-len", type=int, default=None,
                   help="caption / instruction tokens (default: 16 tiny, 64 small, 256 full)")
    p.add_argument("--micro-batch", type=int, nargs="+", default=[2],
                   help="rows per device and micro-step (several: one row each)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--task", nargs="+", choices=("t2i", "edit"), default=["t2i"])
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--remat", nargs="+", default=["none"],
                   help="remat policies (unialign_jax.models.remat; several: one row each)")
    p.add_argument("--attention", default="auto", help="attention kernel (default auto)")
    p.add_argument("--iters", type=int, default=3, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed repeats; the median and the spread are reported")
    p.add_argument("--torch", dest="torch", action="store_true", default=None,
                   help="also time the PyTorch reference step (default on CPU)")
    p.add_argument("--no-torch", dest="torch", action="store_false")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads for both frameworks")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def configs(args):
    """(TrainConfig, vocab size) of the preset, all sizes from the preset table."""
    from unialign_jax import configlib
    from unialign_jax.training.config import TrainConfig

    (layers, heads, head_dim), (t5_layers, d_model, t5_heads, d_ff), channels = \
        PRESETS[args.preset]
    full = args.preset == "full"
    vocab = 32100 if full else 512
    overrides = [
        f"models.transformer={{'num_layers': {layers}, 'num_heads': {heads}, "
        f"'head_dim': {head_dim}, 'joint_attention_dim': {d_model}, 'vocab_size': {vocab}}}",
        f"models.t5={{'num_layers': {t5_layers}, 'd_model': {d_model}, 'num_heads': "
        f"{t5_heads}, 'head_dim': 64, 'd_ff': {d_ff}, 'vocab_size': {max(vocab, 32128 * full)}}}",
        f"models.vae={{'block_out_channels': {tuple(channels)}, 'norm_num_groups': "
        f"{min(32, channels[0])}}}",
        f"compute.dtype={args.dtype}", "compute.param_dtype=float32",
        f"compute.frozen_param_dtype={args.dtype}", f"compute.remat_policy={args.remat}",
        f"compute.attention={args.attention}", f"data.resolution={args.resolution}",
        f"data.max_length={args.text_len}", "optimizer.warmup_steps=0",
        f"loss.block_depth={min(8, layers)}",
        f"run.micro_batch_per_device={args.micro_batch}"]
    return configlib.apply_overrides(TrainConfig(), overrides), vocab


def time_calls(call, iters: int, repeats: int) -> list[float]:
    """Seconds per call of `repeats` timed runs of `iters` calls (after one warm-up)."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            call()
        times.append((time.perf_counter() - start) / iters)
    return times


def jax_step(args, cfg, vocab, task: str):
    """Seconds per step of our jitted train step, and its global batch."""
    import dataclasses

    import jax
    import numpy as np

    from unialign_jax.data import batch as batch_spec
    from unialign_jax.parallel import batch_ways, make_mesh, replicated
    from unialign_jax.training.models import build_models
    from unialign_jax.training.step import FrozenModels, make_train_step

    mesh = make_mesh()
    rows = args.micro_batch * args.accum * batch_ways(mesh)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, batch_size=rows))
    models = build_models(cfg.models, cfg.compute, mesh, vocab)
    null_ids = jax.device_put(np.ones((1, cfg.data.max_length), np.int32), replicated(mesh))
    frozen = FrozenModels.of(models, null_ids)
    trainer = make_train_step(models, frozen, mesh, optimizer=cfg.optimizer, loss=cfg.loss,
                              run=cfg.run, mask_id=vocab - 1)
    rng = np.random.default_rng(0)
    shapes = batch_spec.shapes(batch_size=rows, resolution=cfg.data.resolution,
                               max_length=cfg.data.max_length,
                               num_sources=int(task == "edit"),
                               teacher_dim=cfg.models.transformer.teacher_dim)
    host = {k: (rng.integers(0, vocab - 1, shape) if np.issubdtype(dtype, np.integer)
                else rng.uniform(-1, 1, shape)).astype(dtype)
            for k, (shape, dtype) in shapes.items()}
    batch = trainer.put_batch(host)
    state = [trainer.init()]
    analysis = trainer.step.lower(state[0], frozen, batch).compile().memory_analysis()
    memory = {"xla_temp_gib": analysis.temp_size_in_bytes / 2**30,
              "xla_argument_gib": analysis.argument_size_in_bytes / 2**30}

    def call():
        state[0], metrics = trainer.step(state[0], frozen, batch)
        jax.block_until_ready(metrics)

    times = time_calls(call, args.iters, args.repeats)
    stats = jax.devices()[0].memory_stats() or {}  # accelerators: the allocator's peak
    if "peak_bytes_in_use" in stats:
        memory["device_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
    return times, rows, memory


def main(argv=None) -> int:
    args = parse_args(argv)
    defaults = {"tiny": (64, 16), "small": (256, 64), "full": (512, 256)}[args.preset]
    args.resolution = args.resolution or defaults[0]
    args.text_len = args.text_len or defaults[1]
    os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true "
                                       f"intra_op_parallelism_threads={args.threads}")
    import jax

    backend = jax.default_backend()
    use_torch = args.torch if args.torch is not None else backend == "cpu"
    runs = [argparse.Namespace(**{**vars(args), "remat": remat, "micro_batch": micro})
            for remat in args.remat for micro in args.micro_batch]
    results = []
    torch_times = {}
    if use_torch:  # once, at the first setting: the reference has no remat
        import torch_reference  # scripts/torch_reference.py

        cfg, vocab = configs(runs[0])
        for task in args.task:
            torch_times[task] = torch_reference.time_step(runs[0], cfg, vocab, task,
                                                          time_calls)

    from unialign_jax.training import flops

    kind = jax.devices()[0].device_kind
    for run, task in ((run, task) for run in runs for task in args.task):
        cfg, vocab = configs(run)
        times, rows, memory = jax_step(run, cfg, vocab, task)
        per_sample = flops.sample_flops(
            cfg.models.transformer, cfg.models.t5, cfg.models.vae,
            flops.StepShape(args.resolution, args.text_len, int(task == "edit")))["total"]
        median = statistics.median(times)
        sps = rows / median
        row = {"task": task, "preset": args.preset, "resolution": args.resolution,
               "text_len": args.text_len, "rows_per_step": rows, "dtype": args.dtype,
               "remat": run.remat, "micro_batch": run.micro_batch,
               "attention": args.attention,
               "step_s": {"median": median, "min": min(times), "max": max(times),
                          "repeats": args.repeats, "iters": args.iters},
               "samples_per_s": sps, "model_tflop_per_sample": per_sample / 1e12,
               "model_tflops": sps * per_sample / 1e12 / jax.device_count(),
               "mfu": flops.mfu(sps, per_sample, jax.device_count(), kind), **memory}
        if task in torch_times and run is runs[0]:
            t = torch_times[task]
            row["torch_step_s"] = {"median": statistics.median(t), "min": min(t),
                                   "max": max(t)}
            row["jax_over_torch"] = statistics.median(t) / median
        results.append(row)
        mfu = f", MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
        ratio = (f", {row['jax_over_torch']:.2f}× PyTorch" if "jax_over_torch" in row else "")
        print(f"{task}, remat {run.remat}, micro-batch {run.micro_batch}: {sps:.2f} samples/s ({min(times):.3f}–{max(times):.3f} s/step over "
              f"{args.repeats} repeats), {row['model_tflops']:.3f} model TFLOP/s per chip"
              f"{mfu}{ratio}; XLA temporaries {row['xla_temp_gib']:.2f} GiB", file=sys.stderr)
    from bench_common import environment, write_json

    write_json(args.json, {"results": results, "threads": args.threads, "device_kind": kind,
                           "devices": jax.device_count(), **environment("cpu")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
