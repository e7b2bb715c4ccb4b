"""Peak host memory of `unialign-convert t5` on a synthetic sharded T5 checkpoint.

Converting T5-XXL (4.7B parameters) must fit a 24 GB machine, so the converter streams one
tensor at a time into a single output copy. This script writes a synthetic T5 v1.1 encoder
of --size-gb in safetensors shards, converts it in a fresh process and reports that
process's peak resident memory against the output size, next to the peak of a process that
only imports the converter (the fixed cost) and, with --torch-reference, of transformers'
own `T5EncoderModel.from_pretrained` on the same folder.

    python scripts/bench_convert_memory.py --size-gb 2.5 [--dtype bfloat16] [--torch-reference]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from tqdm import tqdm

WIDTH, HEADS, HEAD_DIM, D_FF, VOCAB = 2048, 32, 64, 5120, 32128
SHARD_BYTES = 512 * 2**20


def t5_shapes(num_layers: int) -> dict[str, tuple[int, ...]]:
    """transformers' T5EncoderModel state-dict shapes for the benchmark's widths."""
    shapes = {"shared.weight": (VOCAB, WIDTH), "encoder.final_layer_norm.weight": (WIDTH,),
              "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, HEADS)}
    inner = HEADS * HEAD_DIM
    for i in range(num_layers):
        a, f = f"encoder.block.{i}.layer.0", f"encoder.block.{i}.layer.1"
        shapes |= {f"{a}.SelfAttention.{n}.weight": (inner, WIDTH) for n in "qkv"}
        shapes |= {f"{a}.SelfAttention.o.weight": (WIDTH, inner),
                   f"{a}.layer_norm.weight": (WIDTH,),
                   f"{f}.DenseReluDense.wi_0.weight": (D_FF, WIDTH),
                   f"{f}.DenseReluDense.wi_1.weight": (D_FF, WIDTH),
                   f"{f}.DenseReluDense.wo.weight": (WIDTH, D_FF),
                   f"{f}.layer_norm.weight": (WIDTH,)}
    return shapes


def write_source(folder: str, size_gb: float) -> int:
    """A sharded float32 T5 folder of about `size_gb`; returns its parameter count."""
    from safetensors.numpy import save_file

    per_layer = 4 * WIDTH * HEADS * HEAD_DIM + 3 * WIDTH * D_FF
    num_layers = max(1, round((size_gb * 1e9 / 4 - VOCAB * WIDTH) / per_layer))
    shapes = t5_shapes(num_layers)
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    shards, current, size = [], {}, 0
    for key, shape in shapes.items():
        current[key] = shape
        size += int(np.prod(shape)) * 4
        if size >= SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
    shards += [current] if current else []
    weight_map = {}
    for i, shard in enumerate(tqdm(shards, desc="writing synthetic shards")):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: rng.standard_normal(s, np.float32) * 0.02 for k, s in shard.items()},
                  os.path.join(folder, name))
        weight_map |= {k: name for k in shard}
    total = sum(int(np.prod(s)) for s in shapes.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total * 4}, "weight_map": weight_map}, f)
    config = {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": VOCAB,
              "d_model": WIDTH, "d_kv": HEAD_DIM, "num_heads": HEADS, "d_ff": D_FF,
              "num_layers": num_layers, "feed_forward_proj": "gated-gelu",
              "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
              "layer_norm_epsilon": 1e-6}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return total


def peak_rss_of(code: str) -> tuple[float, float]:
    """(peak resident bytes, seconds) of `python -c code` in a fresh process.

    The child reads its own high-water mark (VmHWM, reset by exec) when done; the parent's
    rusage would also count the parent's memory that a forked child inherits.
    """
    report = "\nprint('VmHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code + report], stdout=subprocess.PIPE,
                          text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed ({proc.returncode}): {code}")
    kib = next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("VmHWM"))
    return float(kib) * 1024.0, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.5,
                        help="float32 size of the synthetic checkpoint (default %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="stored dtype of the converted output (default %(default)s)")
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--torch-reference", action="store_true",
                        help="also measure transformers' T5EncoderModel.from_pretrained")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir)
    try:
        src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
        num_params = write_source(src, args.size_gb)
        output_bytes = num_params * (4 if args.dtype == "float32" else 2)
        base, _ = peak_rss_of("import jax, orbax.checkpoint, unialign_convert.cli, unialign_jax.models.t5")
        peak, seconds = peak_rss_of("from unialign_convert.t5 import convert_t5\n"
                                    f"convert_t5({src!r}, {dst!r}, dtype={args.dtype!r})")
        results = {
            "num_params": num_params, "source_bytes": num_params * 4, "dtype": args.dtype,
            "output_bytes": output_bytes, "peak_rss_bytes": peak, "import_rss_bytes": base,
            "peak_over_output": peak / output_bytes,
            "peak_minus_import_over_output": (peak - base) / output_bytes,
            "convert_seconds": seconds}
        if args.torch_reference:
            shutil.rmtree(dst)
            # from_pretrained memory-maps the files; summing every weight makes them resident,
            # as any use of the model does.
            torch_peak, torch_seconds = peak_rss_of(
                "import torch; from transformers import T5EncoderModel\n"
                f"m = T5EncoderModel.from_pretrained({src!r}, dtype=torch.float32)\n"
                "with torch.no_grad(): sum(float(p.sum()) for p in m.parameters())")
            results |= {"torch_from_pretrained_peak_rss_bytes": torch_peak,
                        "torch_from_pretrained_seconds": torch_seconds,
                        "peak_over_torch_peak": peak / torch_peak}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    gib = 2.0**30
    print(f"synthetic T5: {num_params / 1e6:.0f}M parameters, source {num_params * 4 / gib:.2f} "
          f"GiB float32 (sharded), output {output_bytes / gib:.2f} GiB {args.dtype}")
    print(f"peak RSS converting: {peak / gib:.2f} GiB = {peak / output_bytes:.2f}x the output "
          f"({(peak - base) / output_bytes:.2f}x above the {base / gib:.2f} GiB import cost), "
          f"{seconds:.0f} s")
    if args.torch_reference:
        print(f"transformers T5EncoderModel.from_pretrained peak RSS: {torch_peak / gib:.2f} GiB "
              f"(ratio ours/torch {peak / torch_peak:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
