"""Per-device memory of the full-size UniAlignment train step, from XLA, without weights.

    python scripts/memory_plan.py                      # 64 simulated devices, 512 px
    python scripts/memory_plan.py --devices 64 --mesh 1,64,1 --mesh 4,16,1 --task edit

Builds the 2.18B transformer, the T5-XXL encoder and the SD3 VAE as abstract shapes
(`nnx.eval_shape`: nothing is allocated), places them with the logical-axis rules on a
mesh of simulated CPU devices, lowers and compiles the real train step
(`unialign_jax.training.step.make_train_step`, the code path the TPU scripts run) and prints
what `compiled.memory_analysis()` reports per device. The budget column is a TPU v5e
chip's 16 GiB HBM. Compiling takes minutes on a small CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

GIB = 1024 ** 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=64, help="simulated devices (64)")
    p.add_argument("--mesh", action="append", metavar="DATA,FSDP,TENSOR",
                   help="mesh shape(s) to plan (default 1,64,1); repeatable")
    p.add_argument("--micro-batch-per-device", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=384, help="global batch (384)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--task", choices=("t2i", "edit"), action="append",
                   help="batch kind(s): t2i (target only) or edit (+1 source image); "
                        "default both")
    p.add_argument("--remat", default="nothing_saveable",
                   help="remat policy name (unialign_jax.models.remat), or 'none'")
    p.add_argument("--budget-gib", type=float, default=16.0, help="per-chip HBM (v5e: 16)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np

    import unialign_configs
    from unialign_jax import configlib
    from unialign_jax.parallel import make_mesh, replicated
    from unialign_jax.training.models import build_models
    from unialign_jax.training.step import FrozenModels, make_train_step

    rows = []
    for mesh_text in args.mesh or ["1,64,1"]:
        data, fsdp, tensor = (int(v) for v in mesh_text.split(","))
        cfg = configlib.apply_overrides(unialign_configs.load("unialignment_512"), [
            f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}",
            f"run.batch_size={args.batch_size}",
            f"run.micro_batch_per_device={args.micro_batch_per_device}",
            f"data.resolution={args.resolution}", f"compute.remat_policy={args.remat}"])
        mesh = make_mesh(data, fsdp, tensor, devices=jax.devices()[:args.devices])
        models = build_models(cfg.models, cfg.compute, mesh, None, abstract=True)
        null_ids = jax.ShapeDtypeStruct((1, cfg.data.max_length), np.int32,
                                        sharding=replicated(mesh))
        frozen = FrozenModels.of(models, null_ids)
        trainer = make_train_step(models, frozen, mesh, optimizer=cfg.optimizer,
                                  loss=cfg.loss, run=cfg.run, mask_id=32099)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(models["transformer"].params))
        n_t5 = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(models["t5"].rest))
        for task in args.task or ["t2i", "edit"]:
            batch = abstract_batch(cfg, trainer, task)
            start = time.time()
            compiled = trainer.step.lower(trainer.abstract_state, frozen, batch).compile()
            mem = compiled.memory_analysis()
            rows.append(dict(
                mesh=f"{data}x{fsdp}x{tensor}", task=task, accum=trainer.num_micro,
                micro=cfg.run.micro_batch_per_device,
                args=mem.argument_size_in_bytes / GIB, out=mem.output_size_in_bytes / GIB,
                alias=mem.alias_size_in_bytes / GIB, temp=mem.temp_size_in_bytes / GIB,
                code=mem.generated_code_size_in_bytes / GIB,
                total=(mem.argument_size_in_bytes + mem.output_size_in_bytes
                       - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / GIB,
                compile_s=time.time() - start))
            print(f"compiled {rows[-1]['mesh']} {task}: {rows[-1]['compile_s']:.0f} s "
                  f"(transformer {n_params / 1e9:.3f}B trained, T5 {n_t5 / 1e9:.3f}B frozen)",
                  file=sys.stderr, flush=True)
    print_table(rows, args.budget_gib)
    return 0 if all(r["total"] <= args.budget_gib for r in rows) else 1


def abstract_batch(cfg, trainer, task: str) -> dict:
    """ShapeDtypeStructs of one global batch (`data.batch.shapes`), split over data × fsdp
    like real batches."""
    import jax

    from unialign_jax.data import batch

    shapes = batch.shapes(batch_size=cfg.run.batch_size, resolution=cfg.data.resolution,
                          max_length=cfg.data.max_length, num_sources=int(task == "edit"),
                          teacher_dim=cfg.models.transformer.teacher_dim)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=trainer.batch_sharding)
            for k, (shape, dtype) in shapes.items()}


def print_table(rows, budget: float) -> None:
    head = ("mesh d×f×t", "task", "micro/dev", "accum", "args GiB", "out GiB", "alias GiB",
            "temp GiB", "total GiB", f"fits {budget:g} GiB")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        print(f"| {r['mesh']} | {r['task']} | {r['micro']} | {r['accum']} | {r['args']:.2f} | "
              f"{r['out']:.2f} | {r['alias']:.2f} | {r['temp']:.2f} | {r['total']:.2f} | "
              f"{'yes' if r['total'] <= budget else 'NO'} |")


if __name__ == "__main__":
    sys.exit(main())
