"""Benchmark: decoded, transformed samples/s of the Grain pipeline at 512 px.

    python scripts/bench_data.py --workers 2 --batches 40

Writes a photo-like corpus (multi-scale noise textures, 768x576 JPEGs like web photos),
builds text-to-image and editing shards with `unialign-data build`'s code, then times the
training pipeline (alternating t2i / edit batches, workers, prefetch, tokenisation) after
one warm-up batch per worker. Prints a JSON summary with the rate one TPU host needs, from

    step FLOPs ≈ 6 · N · tokens (forward + backward of the MMDiT, attention ignored)
               + 2 · N_T5 · 2 · 256 (frozen T5-XXL: instruction and masked caption)
               + VAE encoder FLOPs per image,

per sample of the global batch, at an assumed model FLOPs utilisation (MFU) of the slice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image
from tqdm import tqdm

from bench_common import OTHERS_LIMIT, CpuWatch, environment, write_json

MMDIT_PARAMS = 2.18e9          # spec section 2
T5_ENCODER_PARAMS = 4.76e9     # T5 v1.1 XXL encoder
VAE_ENCODER_FLOPS = 0.6e12     # SD3 VAE encoder at 512 px, per image (assumption)
TEXT_TOKENS = 256


def required_rate(resolution: int, global_batch: int, chips: int, chips_per_host: int,
                  chip_flops: float, mfu: float) -> dict:
    """Samples/s one host must deliver so that data never stalls the training step."""
    image_tokens = (resolution // 16) ** 2  # 8x VAE, 2x2 patches

    def sample_flops(sources: int) -> float:
        image_pass = image_tokens * (1 + sources) + TEXT_TOKENS
        caption_pass = image_tokens + TEXT_TOKENS
        return (6 * MMDIT_PARAMS * (image_pass + caption_pass)
                + 2 * T5_ENCODER_PARAMS * 2 * TEXT_TOKENS + VAE_ENCODER_FLOPS * (1 + sources))

    step_flops = global_batch * (sample_flops(0) + sample_flops(1)) / 2  # t2i, edit alternate
    step_s = step_flops / (chips * chip_flops * mfu)
    per_host = global_batch / (chips // chips_per_host)
    return {"assumptions": {"global_batch": global_batch, "chips": chips,
                            "chips_per_host": chips_per_host, "chip_bf16_flops": chip_flops,
                            "mfu": mfu, "mmdit_params": MMDIT_PARAMS,
                            "t5_encoder_params": T5_ENCODER_PARAMS,
                            "vae_encoder_flops_per_image": VAE_ENCODER_FLOPS},
            "step_flops": step_flops, "step_seconds": round(step_s, 2),
            "samples_per_host_per_step": per_host,
            "samples_per_s_per_host": round(per_host / step_s, 1),
            "images_per_s_per_host": round(1.5 * per_host / step_s, 1)}


def photo_like(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth shapes plus fine texture: compresses like a photograph, not like flat colour."""
    out = np.zeros((h, w, 3), np.float32)
    for cells, amplitude in ((4, 70.0), (16, 35.0), (64, 15.0)):
        noise = rng.normal(0, amplitude, (cells, cells, 3)).astype(np.float32)
        for c in range(3):
            out[..., c] += np.asarray(Image.fromarray(noise[..., c], "F").resize((w, h), Image.BICUBIC))
    out += rng.normal(0, 6, out.shape).astype(np.float32) + 128
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def write_corpus(folder: str, n: int, seed: int) -> dict:
    paths = {kind: os.path.join(folder, f"{kind}.jsonl") for kind in ("t2i", "edit")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths  # a kept --work-dir
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    for i in tqdm(range(n + 1), desc="source images"):
        photo_like(rng, 768, 576).save(os.path.join(folder, "img", f"{i}.jpg"), quality=90)
    conv = lambda i: [{"from": "human", "value": f"a photograph number {i} of a quiet street"},
                      {"from": "gpt", "value": "<image>"}]
    files = {"t2i": [{"image": [f"img/{i}.jpg"], "conversations": conv(i)} for i in range(n)],
             "edit": [{"image": [f"img/{i + 1}.jpg", f"img/{i}.jpg"], "conversations": conv(i),
                       "instruction": "make it look like an autumn evening"} for i in range(n)]}
    for kind, lines in files.items():
        with open(paths[kind], "w") as f:
            f.write("\n".join(json.dumps(x) for x in lines) + "\n")
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--records", type=int, default=192, help="records per task (192)")
    parser.add_argument("--batch-size", type=int, default=24,
                        help="per-host batch (24 = 384 global over a v5e-64's 16 hosts)")
    parser.add_argument("--batches", type=int, default=40, help="timed batches (40)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="pipeline worker processes (all cores)")
    parser.add_argument("--read-threads", type=int, default=2)
    parser.add_argument("--image-format", choices=("png", "jpeg", "raw"), default="png")
    parser.add_argument("--work-dir", help="keep corpus and shards here (default: a temp dir)")
    parser.add_argument("--json-out", help="also write the summary to this file")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed MFU of the slice (0.4)")
    args = parser.parse_args(argv)

    from unialign_jax.data.build import synth
    from unialign_jax.data.build.shards import BuildOptions, build
    from unialign_jax.data.read.grain_pipeline import PipelineConfig, training_iterator
    from unialign_jax.text.tokenizer import train_tiny_tokenizer

    work = args.work_dir or tempfile.mkdtemp(prefix="bench_data_")
    jsonl = write_corpus(os.path.join(work, "corpus"), args.records, seed=0)
    folders, build_rate = {}, {}
    for kind, path in jsonl.items():
        folders[kind] = os.path.join(work, f"shards_{kind}_{args.image_format}")
        if not os.path.exists(os.path.join(folders[kind], "summary.json")):
            start = time.perf_counter()
            build([path], folders[kind], BuildOptions(
                kind=kind, resolution=args.resolution, image_format=args.image_format,
                records_per_shard=64, workers=max(1, args.workers)), force=True)
            build_rate[kind] = round(args.records / (time.perf_counter() - start), 1)
    tokenizer = os.path.join(work, "tokenizer")
    train_tiny_tokenizer(synth.corpus_texts() + ["a photograph number 1 of a quiet street"],
                         tokenizer, vocab_size=100)

    cfg = PipelineConfig(batch_size=args.batch_size, tokenizer=tokenizer, process_index=0,
                         process_count=1, num_workers=args.workers,
                         read_threads=args.read_threads)
    it = training_iterator({"t2i": [folders["t2i"]], "edit": [folders["edit"]]}, cfg)
    for _ in range(max(2, args.workers)):  # worker start-up is not throughput
        next(it)
    samples = images = 0
    watch = CpuWatch().start()  # the pipeline's worker processes count as ours
    start = time.perf_counter()
    for _ in tqdm(range(args.batches), desc="pipeline", unit="batch"):
        batch = next(it)
        samples += len(batch["target"])
        sources = batch["sources"].shape[1] if "sources" in batch else 0
        images += len(batch["target"]) * (1 + sources)
    elapsed = time.perf_counter() - start
    load = watch.stop()
    it.close()

    summary = {
        "resolution": args.resolution, "image_format": args.image_format,
        "batch_size": args.batch_size, "workers": args.workers, "read_threads": args.read_threads,
        "samples_per_s": round(samples / elapsed, 1), "images_per_s": round(images / elapsed, 1),
        "build_samples_per_s": build_rate,
        "target_v5e_64": required_rate(args.resolution, 384, 64, 4, 197e12, args.mfu),
        "load": load, "args": vars(args), **environment(),
    }
    others = load["others_cpus"]
    if others is not None and others > OTHERS_LIMIT * load["cpus"]:
        print(f"NOISY MACHINE: other processes used {others:.2f} of the {load['cpus']} CPUs "
              f"while this ran: the rate is a lower bound; rerun on an idle machine",
              file=sys.stderr)
    write_json(args.json_out, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
