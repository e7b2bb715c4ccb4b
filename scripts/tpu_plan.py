"""Per-chip plan of a TPU program, from the TPU compiler, on any host (no TPU, no weights).

    python scripts/tpu_plan.py --topology v5e:8x8 --mesh 1,64,1            # train, t2i, 512 px
    python scripts/tpu_plan.py --topology v5p:4x4x4 --mesh 1,64,1 --task edit --json edit.json
    python scripts/tpu_plan.py --topology v5e:8x8 --mesh 1,64,1 --sweep --remat nothing_saveable \\
        --remat save_attention                       # largest micro-batch per chip per policy
    python scripts/tpu_plan.py --topology v5e:1x1 --mesh 1,1,1 --program sample-t2i \\
        --resolution 1024 --batch-size 4             # the whole pipeline, bf16, on one chip

The program is the real one: `--program train` lowers the train step the pod scripts run
(`unialign_jax.training.step.make_train_step` on `runs.builder.build_models`, config
`--config`, default unialignment_512, plus `section.key=value` overrides); the sampling
programs (`sample-t2i`, `sample-edit`, `caption`) lower the pipeline's jitted calls (T5-XXL
encode, the Euler loop or the caption loop over the transformer, VAE encode / decode) with
the pipeline's models in bf16. Every model is an abstract shape placed by the logical-axis
rules on a mesh over the abstract devices of the named topology
(`jax.experimental.topologies`; device order as `jax.make_mesh` gives a pod), and the TPU
compiler (libtpu: `pip install -e '.[tpu]'`) compiles it for those chips.

Per chip it prints (and `--json FILE` writes): HBM arguments / outputs / aliased /
temporaries / total against the chip's HBM, whether it fits, the attention kernel the
transformer resolves to, whether the Mosaic kernel is in the HLO, compile seconds, the
collectives of the HLO by kind, and the compiler's FLOPs per chip next to the analytical
model FLOPs (`training.flops`; train only). `--hlo FILE` writes the compiled HLO text.
For sampling, the pipeline keeps all three models resident: its peak is every model's
weights plus the largest other use (inputs, outputs, temporaries) of any one program.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

GIB = 1024 ** 3
# HBM per chip by `device_kind` (Cloud TPU documentation).
HBM_GIB = (("TPU v6 lite", 32), ("TPU v5 lite", 16), ("TPU v5", 95), ("TPU v4", 32))
PROGRAMS = ("train", "sample-t2i", "sample-edit", "caption")
CONDITIONS = {"t2i": 0, "edit": 1, "compose": 3}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
SWEEP_POLICIES = ("nothing_saveable", "save_attention")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="v5e:8x8",
                   help="TPU topology (get_topology_desc name): v5e:8x8, v5p:4x4x4, v6e:2x2, ...")
    p.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                   help="mesh shape (default: every chip on fsdp)")
    p.add_argument("--program", choices=PROGRAMS, default="train")
    p.add_argument("--task", choices=tuple(CONDITIONS), default="t2i",
                   help="train: the batch kind (condition images: edit 1, compose 3)")
    p.add_argument("--config", default="unialignment_512", help="train config (name or .py)")
    p.add_argument("--micro-batch-per-device", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None,
                   help="train: global batch (config's); sampling: images per call (1)")
    p.add_argument("--resolution", type=int, default=None,
                   help="pixels per side (the config's: 512)")
    p.add_argument("--remat", action="append", default=None,
                   help="remat policy (unialign_jax.models.remat); --sweep: repeatable "
                        f"(default {', '.join(SWEEP_POLICIES)})")
    p.add_argument("--sweep", action="store_true",
                   help="train: per remat policy, the largest micro-batch per chip that fits")
    p.add_argument("--steps", type=int, default=28, help="sampling: Euler / caption steps")
    p.add_argument("--json", default=None, metavar="FILE", help="write the rows as JSON")
    p.add_argument("--hlo", default=None, metavar="FILE", help="write the compiled HLO text")
    p.add_argument("overrides", nargs="*", help="config overrides: section.key=value")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # The host's own backend only traces: keep JAX from probing for a local TPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.sweep and args.program != "train":
        raise SystemExit("--sweep plans the train step's micro-batch; use it with --program train")
    plan = Planner(args)
    if args.sweep:
        rows = plan.sweep(args.remat or list(SWEEP_POLICIES))
    else:
        rows = [plan.run((args.remat or [None])[0], args.micro_batch_per_device, hlo=args.hlo)]
    print_table(rows)
    if args.json:
        from unialign_jax import files
        files.write_json(args.json, rows)
    return 0 if all(r["fits"] for r in rows if not args.sweep) else 1


class Planner:
    """Compiles one program for one topology and mesh; `run` gives one row."""

    def __init__(self, args):
        from unialign_jax.parallel import make_mesh
        from unialign_jax.parallel.mesh import tpu_topology_devices

        self.args = args
        devices = tpu_topology_devices(args.topology)
        shape = ((1, -1, 1) if args.mesh is None
                 else tuple(int(v) for v in args.mesh.split(",")))
        self.mesh = make_mesh(*shape, devices=devices)
        self.kind = devices[0].device_kind
        self.hbm = next((gib for kind, gib in HBM_GIB if self.kind.startswith(kind)), None)

    def sweep(self, policies) -> list[dict]:
        """Per policy: micro-batches per chip that divide the per-chip batch, largest first,
        until one fits (each compile is minutes at full size)."""
        cfg = self.train_config(None, None)
        per_chip = cfg.run.batch_size // self.mesh.size
        rows = []
        for policy in policies:
            for micro in sorted((m for m in range(1, per_chip + 1) if per_chip % m == 0),
                                reverse=True):
                rows.append(self.run(policy, micro))
                if rows[-1]["fits"]:
                    rows[-1]["largest_fitting"] = True
                    break
        return rows

    def run(self, remat, micro, hlo=None) -> dict:
        from unialign_jax import compilation_cache

        program = self.args.program
        start = time.time()
        with compilation_cache.writing_nothing():  # abstract chips: nothing could load it
            if program == "train":
                row, compiled = self.train(remat, micro)
            else:
                row, compiled = self.sample(program)
        row.update(topology=self.args.topology, device_kind=self.kind, chips=self.mesh.size,
                   mesh="x".join(str(self.mesh.shape[a]) for a in self.mesh.axis_names),
                   program=program, hbm_gib=self.hbm, libtpu=libtpu_version(),
                   seconds=round(time.time() - start, 1))
        row["fits"] = self.hbm is not None and row["total_gib"] <= self.hbm
        text = "\n".join(c.as_text() for c in compiled)
        row["mosaic_kernels"] = text.count("tpu_custom_call")
        row["collectives"] = collectives(text)
        if hlo:
            with open(hlo, "w") as f:
                f.write(text)
        print(json.dumps(row), file=sys.stderr, flush=True)
        return row

    # -- train ----------------------------------------------------------------------------
    def train_config(self, remat, micro):
        import unialign_configs
        from unialign_jax import configlib

        a = self.args
        overrides = [f"mesh.{axis}={self.mesh.shape[axis]}" for axis in self.mesh.axis_names]
        for key, value in (("run.batch_size", a.batch_size), ("data.resolution", a.resolution),
                           ("run.micro_batch_per_device", micro), ("compute.remat_policy", remat)):
            if value is not None:
                overrides.append(f"{key}={value}")
        return configlib.apply_overrides(unialign_configs.load(a.config),
                                         overrides + list(a.overrides))

    def train(self, remat, micro):
        import jax
        import numpy as np

        from unialign_jax.models import attention
        from unialign_jax.parallel import replicated
        from unialign_jax.training import flops
        from unialign_jax.runs.builder import (build_models, frozen_configs,
                                                  transformer_config)
        from unialign_jax.training.step import FrozenModels, make_train_step

        cfg = self.train_config(remat, micro)
        mesh = self.mesh
        models = build_models(cfg.models, cfg.compute, mesh, None, abstract=True)
        null_ids = jax.ShapeDtypeStruct((1, cfg.data.max_length), np.int32,
                                        sharding=replicated(mesh))
        frozen = FrozenModels.of(models, null_ids)
        trainer = make_train_step(models, frozen, mesh, optimizer=cfg.optimizer,
                                  loss=cfg.loss, run=cfg.run, mask_id=0)
        batch = abstract_batch(cfg, trainer.batch_sharding, self.args.task)
        start = time.time()
        compiled = trainer.step.lower(trainer.abstract_state, frozen, batch).compile()
        compile_s = time.time() - start
        per_sample = flops.sample_flops(
            transformer_config(cfg.models, None), *frozen_configs(cfg.models),
            flops.StepShape(cfg.data.resolution, cfg.data.max_length,
                            CONDITIONS[self.args.task]))["total"]
        row = dict(task=self.args.task, resolution=cfg.data.resolution,
                   batch_size=cfg.run.batch_size,
                   micro_batch_per_device=cfg.run.micro_batch_per_device,
                   accumulation=trainer.num_micro, remat=cfg.compute.remat_policy,
                   attention=attention.resolve_implementation(
                       cfg.compute.attention, attention.platform(_shard(mesh)),
                       dtype=cfg.compute.dtype),
                   compile_s=round(compile_s, 1),
                   model_tflops_per_chip=per_sample * cfg.run.batch_size / mesh.size / 1e12,
                   **memory(compiled), **compiler_flops([compiled]))
        return row, [compiled]

    # -- sampling ---------------------------------------------------------------------------
    def sample(self, program):
        """The pipeline's jitted programs for one call of `program`, lowered on abstract
        bf16 models; the peak adds every resident model's weights to the largest other use
        of any one program."""
        import jax
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx

        from unialign_jax.diffusion import flow
        from unialign_jax.models import attention
        from unialign_jax.sampling import caption, image_sampler, unialign_pipeline

        a = self.args
        mesh = self.mesh
        cfg = self.train_config(None, None)
        models = abstract_pipeline_models(cfg, mesh)
        batch = a.batch_size or 1
        res = cfg.data.resolution
        length = cfg.data.max_length
        ways = _batch_ways(mesh)
        rows = -(-batch // ways) * ways  # the pipeline pads a call to the batch split
        split = _batch_sharding(mesh)
        whole = _replicated(mesh)
        vae_cfg = models["vae"].config
        side = res // vae_cfg.downsample_factor
        latents = jax.ShapeDtypeStruct((rows, side, side, vae_cfg.latent_channels), jnp.float32,
                                       sharding=split)
        ids = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=split)
        defs = {k: nnx.split(m) for k, m in models.items()}
        programs = []  # (name, lowered, weights it reads)

        def add(name, lowered, weights):
            programs.append((name, lowered, weights))

        add("t5_encode", unialign_pipeline._call.lower(
            defs["t5"][0], "__call__", defs["t5"][1], ids), "t5")
        keys = jax.ShapeDtypeStruct((rows,), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                                    sharding=split)
        pixels = jax.ShapeDtypeStruct((rows, res, res, 3), jnp.float32, sharding=split)
        if program in ("sample-edit", "caption"):
            add("vae_encode", unialign_pipeline._encode_each.lower(
                defs["vae"][0], defs["vae"][1], pixels, keys), "vae")
        if program == "caption":
            add("caption_loop", caption._caption_loop.lower(
                caption.ModelDenoiser(defs["t5"][0], defs["transformer"][0]),
                (defs["t5"][1], defs["transformer"][1], latents), ids, keys,
                jax.ShapeDtypeStruct((a.steps + 1,), jnp.float32, sharding=whole),
                np.float32(1.0 / a.steps), mask_id=0, reuse_probs=True), "t5+transformer")
        else:
            width = models["t5"].config.d_model
            context = jax.ShapeDtypeStruct((rows, length, width), jnp.bfloat16, sharding=split)
            negative = context  # `sample_images` broadcasts the negative prompt's states
            conditions = (latents,) if program == "sample-edit" else ()
            add("euler_loop", image_sampler._euler_loop.lower(
                defs["transformer"][0], defs["transformer"][1], latents, context, negative,
                conditions, jax.ShapeDtypeStruct((a.steps + 1,), jnp.float32, sharding=whole),
                jnp.float32(7.0), num_train_timesteps=flow.NUM_TRAIN_TIMESTEPS),
                "transformer")
            add("vae_decode", unialign_pipeline._call.lower(
                defs["vae"][0], "decode", defs["vae"][1], latents), "vae")
        weights = {k: per_chip_bytes(d[1]) for k, d in defs.items()}
        resident = sum(weights.values())
        compiled, parts, compile_s = [], {}, 0.0
        for name, lowered, reads in programs:
            start = time.time()
            compiled.append(lowered.compile())
            compile_s += time.time() - start
            mem = memory(compiled[-1])
            read = sum(weights[k] for k in reads.split("+")) / GIB
            mem["other_gib"] = round(mem["total_gib"] - read, 3)
            parts[name] = mem
        largest = max(parts, key=lambda n: parts[n]["other_gib"])
        row = dict(task=program.removeprefix("sample-"), resolution=res, batch_size=batch,
                   rows_per_call=rows, steps=a.steps, dtype="bfloat16",
                   attention=attention.resolve_implementation("auto", attention.platform(
                       _shard(mesh)), dtype=jnp.bfloat16),
                   weights_gib={k: round(v / GIB, 3) for k, v in weights.items()},
                   programs=parts, largest_program=largest,
                   total_gib=round(resident / GIB + parts[largest]["other_gib"], 3),
                   compile_s=round(compile_s, 1), **compiler_flops(compiled))
        return row, compiled


def _shard(mesh):
    from unialign_jax.parallel import ActivationSharding
    return ActivationSharding(mesh)


def _batch_ways(mesh) -> int:
    from unialign_jax.parallel import batch_ways
    return batch_ways(mesh)


def _batch_sharding(mesh):
    from unialign_jax.parallel import batch_sharding
    return batch_sharding(mesh)


def _replicated(mesh):
    from unialign_jax.parallel import replicated
    return replicated(mesh)


def abstract_pipeline_models(cfg, mesh) -> dict:
    """The pipeline's transformer, T5 and VAE as placed bf16 shapes (weights and compute),
    as `load_pipeline(..., Runtime(bfloat16, param_dtype=bfloat16), vae_dtype=bfloat16)` holds
    them on `mesh`."""
    from unialign_jax.runs.config import ComputeConfig
    from unialign_jax.runs.builder import build_models

    compute = ComputeConfig(dtype="bfloat16", param_dtype="bfloat16",
                            frozen_param_dtype="bfloat16", remat_policy="none",
                            attention=cfg.compute.attention)
    models = build_models(cfg.models, compute, mesh, None, abstract=True)
    return {k: m.module() for k, m in models.items()}


def abstract_batch(cfg, sharding, task: str) -> dict:
    """ShapeDtypeStructs of one global batch (`batch_spec.shapes`), split like real ones."""
    import jax

    from unialign_jax.data.read import batch_spec

    shapes = batch_spec.shapes(batch_size=cfg.run.batch_size, resolution=cfg.data.resolution,
                          max_length=cfg.data.max_length, num_sources=CONDITIONS[task],
                          teacher_dim=cfg.models.transformer.teacher_dim)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for k, (shape, dtype) in shapes.items()}


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a tree of placed ShapeDtypeStructs."""
    import jax
    import numpy as np

    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)
    return {"arguments_gib": round(m.argument_size_in_bytes / GIB, 3),
            "outputs_gib": round(m.output_size_in_bytes / GIB, 3),
            "aliased_gib": round(m.alias_size_in_bytes / GIB, 3),
            "temporaries_gib": round(m.temp_size_in_bytes / GIB, 3),
            "total_gib": round(total / GIB, 3)}


def compiler_flops(compiled) -> dict:
    """The compiler's FLOPs per chip (cost analysis of the partitioned program)."""
    total = 0.0
    for c in compiled:
        cost = c.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        total += float(cost.get("flops", 0.0))
    return {"compiler_tflops_per_chip": total / 1e12}


def collectives(hlo: str) -> dict:
    """Collective instructions of the HLO text by kind: the op itself or its async start
    (a start/done pair counts once), or an async wrapper calling it."""
    out = {}
    for kind in COLLECTIVES:
        n = len(re.findall(rf"\s{kind}(?:-start)?\(|async-start\([^\n]*calls=%{kind}", hlo))
        if n:
            out[kind] = n
    return out


def libtpu_version() -> str | None:
    import importlib.metadata
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return None


def print_table(rows) -> None:
    head = ("topology", "mesh", "program", "task", "micro", "remat", "attention", "args",
            "out", "alias", "temp", "total GiB", "HBM", "fits", "kernel", "TFLOP/chip cc|model",
            "compile s")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        get = lambda k, f="{:.2f}": f.format(r[k]) if k in r else "–"  # noqa: E731
        print(f"| {r['topology']} | {r['mesh']} | {r['program']} | {r['task']} | "
              f"{r.get('micro_batch_per_device', r.get('batch_size'))} | {r.get('remat', '–')} | "
              f"{r['attention']} | {get('arguments_gib')} | {get('outputs_gib')} | "
              f"{get('aliased_gib')} | {get('temporaries_gib')} | {r['total_gib']:.2f} | "
              f"{r['hbm_gib']} | {'yes' if r['fits'] else 'NO'} | "
              f"{'splash' if r['mosaic_kernels'] else 'none'} | "
              f"{r['compiler_tflops_per_chip']:.1f}|{get('model_tflops_per_chip', '{:.1f}')} | "
              f"{r['compile_s']:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
