"""Train-step throughput: samples/s, model TFLOP/s and MFU of the full UniAlignment step.

Builds the real train step (`training.step.make_train_step`: transformer + frozen T5 + VAE,
all four loss families, AdamW) with random weights on whatever backend is present, times it
on t2i and/or edit batches and prints samples/s, model TFLOP/s (the analytical count of
`unialign_jax.training.flops`, recomputation not counted) and MFU against the chip's bf16
peak. With --torch (the default on CPU) it also times a PyTorch reference step written the
release's way — diffusers' joint blocks with the UniAlignment heads, transformers' T5,
diffusers' VAE, the same losses in eager mode, AdamW — on the same sizes and threads, each
in its own process, interleaved with our step at the first setting (see `bench_common` for
why, and for when the ratio is withheld), and prints the ratio.

    python scripts/bench_train.py --preset tiny                   # CPU, seconds
    python scripts/bench_train.py --preset small                  # CPU, vs PyTorch
    python scripts/bench_train.py --preset full --dtype bfloat16 --micro-batch 8 \\
        --remat nothing_saveable --task t2i edit --no-torch      # one H100 / H200 / TPU chip
    python scripts/bench_train.py --preset small --no-torch --micro-batch 1 4 \\
        --remat none nothing_saveable dots_saveable save_attention save_qkv_attention

Several --remat / --micro-batch values give one row each (the remat × micro-batch table):
samples/s and XLA's temporaries of the compiled step (plus the allocator's peak on
accelerators). `--latents encode cached` adds a row per value: the step that encodes the
images with the VAE (the release's) and the step on cached posterior moments
(`data.cached_latents`), timed interleaved so that the saving is measured under one load:

    python scripts/bench_train.py --preset small --no-torch --task t2i edit \
        --latents encode cached
"""

from __future__ import annotations

import argparse
import sys

from bench_common import (CpuWatch, Worker, add_timing_arguments, compare, environment,
                          interleaved, print_setup, write_json)

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
    p.add_argument("--latents", nargs="+", choices=("encode", "cached"), default=["encode"],
                   help="encode: the VAE encodes the batch in the step (the release's); "
                        "cached: the batch carries posterior moments (data.cached_latents). "
                        "Both: timed interleaved, one row each")
    p.add_argument("--torch", dest="torch", action="store_true", default=None,
                   help="also time the PyTorch reference step (default on CPU)")
    p.add_argument("--no-torch", dest="torch", action="store_false")
    add_timing_arguments(p, repeats=5, iters=2)
    args = p.parse_args(argv)
    args.latents = list(dict.fromkeys(args.latents))
    defaults = {"tiny": (64, 16), "small": (256, 64), "full": (512, 256)}[args.preset]
    args.resolution = args.resolution or defaults[0]
    args.text_len = args.text_len or defaults[1]
    return args


def configs(args):
    """(TrainConfig, vocab size) of the preset, all sizes from the preset table."""
    from unialign_jax import configlib
    from unialign_jax.runs.config import TrainConfig

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


def setting(args, remat: str, micro_batch: int) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "remat": remat, "micro_batch": micro_batch})


def latent_moments_shape(cfg) -> tuple[int, int]:
    """(h, M) of the cached moments of one image: latent side, 2 × latent channels."""
    vae = cfg.models.vae
    return cfg.data.resolution // vae.downsample_factor, 2 * vae.latent_channels


def jax_side(args) -> dict:
    """(In the JAX worker.) prepare(remat, micro-batch, task, latents) builds and compiles our
    step of one setting (once per latents mode) and returns its rows and XLA's memory
    figures; call(mode) runs one step."""
    import dataclasses

    import jax
    import numpy as np

    from unialign_jax.data.read import batch_spec
    from unialign_jax.parallel import batch_ways, make_mesh, replicated
    from unialign_jax.runs.builder import build_models
    from unialign_jax.training.step import FrozenModels, make_train_step

    current = {}

    def prepare(remat: str, micro_batch: int, task: str, latents: tuple = ("encode",)) -> dict:
        """One compiled step per entry of `latents`; call(mode) runs that one."""
        current.clear()
        run = setting(args, remat, micro_batch)
        cfg, vocab = configs(run)
        mesh = make_mesh()
        rows = run.micro_batch * run.accum * batch_ways(mesh)
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, batch_size=rows))
        models = build_models(cfg.models, cfg.compute, mesh, vocab)
        null_ids = jax.device_put(np.ones((1, cfg.data.max_length), np.int32),
                                  replicated(mesh))
        frozen = FrozenModels.of(models, null_ids)
        trainer = make_train_step(models, frozen, mesh, optimizer=cfg.optimizer,
                                  loss=cfg.loss, run=cfg.run, mask_id=vocab - 1)
        state = [trainer.init()]
        figures = {"rows": rows}
        for mode in latents:
            rng = np.random.default_rng(0)
            shapes = batch_spec.shapes(
                batch_size=rows, resolution=cfg.data.resolution,
                max_length=cfg.data.max_length, num_sources=int(task == "edit"),
                teacher_dim=cfg.models.transformer.teacher_dim,
                latent=latent_moments_shape(cfg) if mode == "cached" else None)
            host = {k: (rng.integers(0, vocab - 1, shape) if np.issubdtype(dtype, np.integer)
                        else rng.uniform(-1, 1, shape)).astype(dtype)
                    for k, (shape, dtype) in shapes.items()}
            batch = trainer.put_batch(host)
            step = trainer.step.lower(state[0], frozen, batch).compile()  # compiled once
            analysis = step.memory_analysis()

            def call(step=step, batch=batch):
                state[0], metrics = step(state[0], frozen, batch)
                jax.block_until_ready(metrics)

            current[mode] = call
            figures[mode] = {"xla_temp_gib": analysis.temp_size_in_bytes / 2**30,
                             "xla_argument_gib": analysis.argument_size_in_bytes / 2**30}
        return figures

    def peak() -> dict:
        stats = jax.devices()[0].memory_stats() or {}  # accelerators: the allocator's peak
        return ({"device_peak_gib": stats["peak_bytes_in_use"] / 2**30}
                if "peak_bytes_in_use" in stats else {})

    return {"prepare": prepare, "call": lambda mode="encode": current[mode](), "peak": peak,
            "backend": jax.default_backend, "device_count": jax.device_count,
            "device": lambda: jax.devices()[0].device_kind}


def torch_side(args) -> dict:
    """(In the PyTorch worker.) prepare(task) builds the reference step (scripts/
    torch_reference.py) at the first setting: the reference has no remat."""
    import torch_reference

    current = {}

    def prepare(remat: str, micro_batch: int, task: str) -> None:
        run = setting(args, remat, micro_batch)
        cfg, vocab = configs(run)
        current["step"] = torch_reference.make_step(run, cfg, vocab, task)

    return {"prepare": prepare, "call": lambda: current["step"](), "device": lambda: "cpu"}


def main(argv=None) -> int:
    args = parse_args(argv)
    from unialign_jax.training import flops  # plain arithmetic: no JAX backend here

    settings = [(remat, micro, task) for remat in args.remat for micro in args.micro_batch
                for task in args.task]
    results = []
    with Worker("JAX", args.threads, jax_side, args) as jax_worker:
        use_torch = (args.torch if args.torch is not None
                     else jax_worker.run("backend") == "cpu")
        kind, chips = jax_worker.run("device"), jax_worker.run("device_count")
        torch_worker = Worker("PyTorch", args.threads, torch_side, args) if use_torch else None
        workers = [w for w in (torch_worker, jax_worker) if w]
        try:
            for remat, micro, task in settings:
                prepared = jax_worker.run("prepare", remat, micro, task, tuple(args.latents))
                rows = prepared.pop("rows")
                sides = {f"JAX {mode}": jax_worker.caller("call", mode) for mode in args.latents}
                with_torch = torch_worker is not None and (remat, micro) == settings[0][:2]
                if with_torch:
                    torch_worker.run("prepare", remat, micro, task)
                    sides = {"PyTorch": torch_worker.caller("call"), **sides}
                watch = CpuWatch().start()
                timings = interleaved(sides, args.repeats, args.iters)
                first = f"JAX {args.latents[0]}"
                both = len(set(args.latents)) == 2
                record = compare(timings, watch.stop(),
                                 f"{task}, remat {remat}, micro-batch {micro}: s per step",
                                 ("PyTorch", first) if with_torch else
                                 ("JAX encode", "JAX cached") if both else None)
                peak = jax_worker.run("peak")
                run = setting(args, remat, micro)
                cfg, _ = configs(run)
                for mode in args.latents:
                    per_sample = flops.sample_flops(
                        cfg.models.transformer, cfg.models.t5, cfg.models.vae,
                        flops.StepShape(args.resolution, args.text_len, int(task == "edit"),
                                        encodes_images=mode == "encode"))["total"]
                    step = record["sides"][f"JAX {mode}"]
                    sps = rows / step["median"]
                    row = {"task": task, "preset": args.preset, "resolution": args.resolution,
                           "text_len": args.text_len, "rows_per_step": rows,
                           "dtype": args.dtype, "remat": remat, "micro_batch": micro,
                           "attention": args.attention, "latents": mode, "step_s": step,
                           "samples_per_s": sps, "model_tflop_per_sample": per_sample / 1e12,
                           "model_tflops": sps * per_sample / 1e12 / chips,
                           "mfu": flops.mfu(sps, per_sample, chips, kind), **prepared[mode],
                           **peak, "warnings": record["warnings"], "load": record["load"]}
                    if with_torch and mode == args.latents[0]:
                        row["torch_step_s"] = record["sides"]["PyTorch"]
                        row["jax_over_torch"] = record["ratio"]  # PyTorch s / JAX s; or null
                    elif both and not with_torch:
                        row["encode_over_cached"] = record["ratio"]  # s / s; null if noisy
                    results.append(row)
                    mfu = f", MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
                    print(f"  → latents {mode}: {sps:.2f} samples/s (median), "
                          f"{row['model_tflops']:.3f} model TFLOP/s per chip{mfu}; XLA "
                          f"temporaries {row['xla_temp_gib']:.2f} GiB", file=sys.stderr)
            env = environment({w.name: w.report() for w in workers})
        finally:
            if torch_worker is not None:
                torch_worker.close()
    print_setup(env)
    write_json(args.json, {"results": results, "repeats": args.repeats, "iters": args.iters,
                           "threads": args.threads, "device_kind": kind, "devices": chips,
                           "args": vars(args), **env})
    return 0


if __name__ == "__main__":
    sys.exit(main())
