"""`unialign-quickstart`: UniAlignment from scratch on synthetic shapes, on a CPU, in minutes.

1. writes the synthetic corpus (`unialign-data synth`: coloured shapes with captions, colour
   edits and segmentation requests) and builds its training shards (`unialign-data build`);
2. trains a tiny T5-layout tokenizer on its texts and fits a tiny VAE to its images (a
   random VAE could not decode generated latents back to colours; see
   `training/vae_fit.py`); the T5 encoder stays random and frozen;
3. trains a tiny UniAlignment transformer with the real trainer (`configs/quickstart.py`;
   alignment losses are off: the synthetic corpus has no Qwen teacher features);
4. evaluates on held-out samples — caption token accuracy of masked-diffusion captions
   after a fixed prompt (the ids all training captions start with, not scored) against
   the per-position majority-token baseline, and the dominant colour of generated images
   against the prompt's colour (chance: 1/6) — and writes WORKDIR/report/:
   loss_curves.png, samples.png, captions.txt, report.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "quickstart.py")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unialign-quickstart", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="unialign_quickstart",
                   help="output folder (default ./unialign_quickstart); rerunning resumes")
    p.add_argument("--samples", type=int, default=3000,
                   help="synthetic samples per kind, 10%% held out (3000)")
    p.add_argument("--vae-steps", type=int, default=400, help="VAE fitting steps (400)")
    p.add_argument("--eval-samples", type=int, default=96,
                   help="held-out prompts / images to evaluate (96)")
    p.add_argument("--sample-steps", type=int, default=20, help="flow sampler steps (20)")
    p.add_argument("--guidance", type=float, default=4.0, help="guidance scale (4.0)")
    p.add_argument("--caption-steps", type=int, default=64,
                   help="masked-diffusion caption sampler steps (64)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="training config overrides, e.g. num_steps=300")
    return p


def _log(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def prepare_data(root: str, n: int, resolution: int) -> dict:
    """Synthetic corpus + shards + tokenizer, each skipped when already complete."""
    from unialign_jax.data.shards import BuildOptions, build
    from unialign_jax.data.synth import corpus_texts, generate
    from unialign_jax.text.tokenizer import train_tiny_tokenizer

    synth, paths = os.path.join(root, "synth"), {}
    if not os.path.exists(os.path.join(synth, "synth.json")):
        _log(f"writing {n} + {n} synthetic samples")
        generate(synth, n, seed=0, size=resolution, heldout=0.1)
    for kind in ("t2i", "edit"):
        out = paths[kind] = os.path.join(root, "shards", kind)
        if not os.path.exists(os.path.join(out, "summary.json")):
            build([os.path.join(synth, f"{kind}_train.jsonl")], out,
                  BuildOptions(kind=kind, resolution=resolution, image_format="raw",
                               records_per_shard=2000, threads=2), force=True)
    paths["tokenizer"] = os.path.join(root, "tokenizer")
    if not os.path.exists(os.path.join(paths["tokenizer"], "tokenizer_config.json")):
        train_tiny_tokenizer(corpus_texts(), paths["tokenizer"], vocab_size=60)
    paths["synth"] = synth
    return paths


def read_split(synth: str, kind: str, split: str, limit: int | None = None):
    """[(pixels in [-1, 1] of every image, caption, instruction)] of a synth JSONL file."""
    from PIL import Image

    from unialign_jax.data.images import to_model_range

    rows = []
    with open(os.path.join(synth, f"{kind}_{split}.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            pixels = [to_model_range(np.asarray(Image.open(os.path.join(synth, p)).convert("RGB")))
                      for p in rec["image"]]
            caption = rec["conversations"][0]["value"]
            rows.append((pixels, caption, rec.get("instruction", caption)))
            if limit and len(rows) >= limit:
                break
    return rows


def prepare_vae(root: str, synth: str, cfg, steps: int) -> tuple[str, dict]:
    from unialign_jax.models.vae import VAEConfig
    from unialign_jax.training.vae_fit import fit_vae, save_vae

    folder = os.path.join(root, "vae")
    info_path = os.path.join(root, "vae_fit.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            return folder, json.load(f)
    images = np.stack([p[0] for p, _, _ in read_split(synth, "t2i", "train", 1024)])
    _log(f"fitting a tiny VAE on {len(images)} images ({steps} steps)")
    start = time.time()
    vae, info = fit_vae(images, VAEConfig(**cfg.vae), steps=steps)
    save_vae(vae, folder, force=True)
    info["seconds"] = time.time() - start
    with open(info_path, "w") as f:
        json.dump(info, f, indent=2)
    return folder, info


def caption_accuracy(generated: np.ndarray, reference: np.ndarray, eos_id: int,
                     start: int = 0) -> float:
    """Token accuracy over each reference caption's tokens from `start` (the first position
    after the prompt) up to, not including, </s>."""
    hits = total = 0
    for gen, ref in zip(generated, reference):
        n = int(np.argmax(ref == eos_id)) if (ref == eos_id).any() else len(ref)
        hits += int((gen[start:n] == ref[start:n]).sum())
        total += max(n - start, 0)
    return hits / max(total, 1)


def shared_prefix(train_ids: np.ndarray) -> np.ndarray:
    """The leading ids that every training caption shares ("▁ a" of "a cyan circle")."""
    same = np.cumprod((train_ids == train_ids[0]).all(axis=0))
    return train_ids[0, :int(same.sum())]


def majority_baseline(train_ids: np.ndarray) -> np.ndarray:
    """The most frequent training token at each position: the best input-blind caption."""
    return np.array([np.bincount(col).argmax() for col in train_ids.T], np.int32)


def evaluate(result, cfg, paths: dict, args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from unialign_jax.data.synth import PALETTE, dominant_colour
    from unialign_jax.sampling import sample_caption, sample_images
    from unialign_jax.sampling.caption import ModelDenoiser
    from unialign_jax.text.tokenizer import decode, load_tokenizer, mask_token_id, tokenize

    tok = load_tokenizer(paths["tokenizer"])
    models = result.trainer.models
    transformer = models["transformer"].module(result.state.ema_params)
    t5, vae = models["t5"].module(), models["vae"].module()
    t5_call = jax.jit(lambda ids: t5(ids))
    heldout = read_split(paths["synth"], "t2i", "heldout", args.eval_samples)
    train_captions = [c for _, c, _ in read_split(paths["synth"], "t2i", "train", 1000)]
    pixels = jnp.asarray(np.stack([p[0] for p, _, _ in heldout]))
    captions = [c for _, c, _ in heldout]
    key = jax.random.key(1234)

    # Captions: masked diffusion conditioned on the clean latent, from a sequence that is
    # all mask but for a VQA-style prompt: the ids every training caption starts with. The
    # text stream has no absolute positions (T5's are relative), so from an all-mask start
    # every position predicts the same marginal and the first ids land at random places;
    # the prompt anchors them. Prompt positions are left out of every score below.
    latents = jax.jit(lambda x, k: vae.encode(x, k, images_per_chunk=x.shape[0]))(pixels, key)
    train_ids = tokenize(tok, train_captions, cfg.max_length)
    prompt = shared_prefix(train_ids)
    init = np.full((len(heldout), cfg.max_length), mask_token_id(tok), np.int32)
    init[:, :len(prompt)] = prompt
    sample = sample_caption(ModelDenoiser(nnx.graphdef(t5), nnx.graphdef(transformer)),
                            (nnx.state(t5), nnx.state(transformer), latents), init,
                            jax.random.fold_in(key, 1), mask_id=mask_token_id(tok),
                            num_steps=args.caption_steps)
    generated = np.asarray(sample.ids)
    reference = tokenize(tok, captions, cfg.max_length)
    baseline = majority_baseline(train_ids)
    texts = decode(tok, generated)

    # Images: text-to-image with guidance against the null prompt, scored by colour.
    context = t5_call(jnp.asarray(reference))
    negative = t5_call(jnp.asarray(tokenize(tok, [" "], cfg.max_length)))
    latent_side = cfg.resolution // vae.cfg.downsample_factor
    noise = jax.random.normal(jax.random.fold_in(key, 2),
                              (len(heldout), latent_side, latent_side, vae.cfg.latent_channels))
    images = sample_images(transformer, noise, context, negative, num_steps=args.sample_steps,
                           guidance_scale=args.guidance, shift=3.0)
    decoded = np.asarray(jax.jit(lambda z: vae.decode(z, images_per_chunk=z.shape[0]))(images))
    recon = np.asarray(jax.jit(lambda z: vae.decode(z, images_per_chunk=z.shape[0]))(latents))
    wanted = [c.split()[1] for c in captions]
    colour_hits = [dominant_colour(img) == w for img, w in zip(decoded, wanted)]
    recon_hits = [dominant_colour(img) == w for img, w in zip(recon, wanted)]

    report_dir = os.path.join(args.workdir, "report")
    os.makedirs(report_dir, exist_ok=True)
    write_grid(os.path.join(report_dir, "samples.png"), decoded[:24], captions[:24])
    with open(os.path.join(report_dir, "captions.txt"), "w") as f:
        for ref, gen in zip(captions, texts):
            f.write(f"{ref!r:32} -> {gen!r}\n")
    return {
        "heldout_samples": len(heldout),
        "caption_prompt": decode(tok, prompt[None])[0],
        "caption_token_accuracy": caption_accuracy(generated, reference, tok.eos_token_id,
                                                   len(prompt)),
        "caption_majority_baseline": caption_accuracy(
            np.broadcast_to(baseline, reference.shape), reference, tok.eos_token_id,
            len(prompt)),
        "caption_exact_match": float(np.mean([g == r for g, r in zip(texts, captions)])),
        "image_colour_accuracy": float(np.mean(colour_hits)),
        "image_colour_chance": 1.0 / len(PALETTE),
        "vae_reconstruction_colour_accuracy": float(np.mean(recon_hits)),
        "caption_examples": [{"reference": r, "generated": g}
                             for r, g in list(zip(captions, texts))[:8]],
    }


def write_grid(path: str, images: np.ndarray, labels: list[str], scale: int = 3) -> None:
    """Generated images (upscaled, nearest) in a grid, each with its prompt underneath."""
    from PIL import Image, ImageDraw

    cols = 6
    rows = -(-len(images) // cols)
    side = images.shape[1] * scale
    cell_h = side + 14
    grid = Image.new("RGB", (cols * side, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (img, label) in enumerate(zip(images, labels)):
        pil = Image.fromarray(np.clip((img + 1) * 127.5, 0, 255).round().astype(np.uint8))
        x, y = (i % cols) * side, (i // cols) * cell_h
        grid.paste(pil.resize((side, side), Image.NEAREST), (x, y))
        draw.text((x + 2, y + side + 1), label[:18], fill=(0, 0, 0))
    grid.save(path)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from unialign_jax.training.config import apply_overrides, load_config
    from unialign_jax.training.metrics import plot_losses
    from unialign_jax.training.trainer import train

    start = time.time()
    if not os.path.exists(CONFIG):
        print(f"unialign-quickstart: error: {CONFIG} not found (run from a source checkout "
              "installed with `pip install -e .`)", file=sys.stderr)
        return 2
    cfg = apply_overrides(load_config(CONFIG), args.overrides)
    root = os.path.abspath(args.workdir)
    os.makedirs(root, exist_ok=True)
    paths = prepare_data(os.path.join(root, "data"), args.samples, cfg.resolution)
    vae_path, vae_info = prepare_vae(root, paths["synth"], cfg, args.vae_steps)
    _log(f"VAE: reconstruction MSE {vae_info['mse']:.4f}")
    cfg = dataclasses.replace(cfg, tokenizer=paths["tokenizer"], vae_path=vae_path,
                              t2i_shards=(paths["t2i"],), edit_shards=(paths["edit"],))
    data_seconds = time.time() - start
    _log(f"training {cfg.num_steps} steps (batch {cfg.batch_size}) in {root}/train")
    result = train(cfg, os.path.join(root, "train"))
    train_seconds = time.time() - start - data_seconds
    _log("evaluating on held-out samples")
    metrics = evaluate(result, cfg, paths, args)
    report_dir = os.path.join(root, "report")
    plot_losses(os.path.join(root, "train", "metrics.jsonl"),
                os.path.join(report_dir, "loss_curves.png"))
    metrics.update(steps=result.step, final_losses=result.last_metrics, vae=vae_info,
                   seconds={"data_and_vae": data_seconds, "train": train_seconds,
                            "total": time.time() - start})
    with open(os.path.join(report_dir, "report.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    _log(f"caption token accuracy after the prompt {metrics['caption_prompt']!r}: "
         f"{metrics['caption_token_accuracy']:.3f} "
         f"(majority-token baseline {metrics['caption_majority_baseline']:.3f}, exact match "
         f"{metrics['caption_exact_match']:.3f})")
    _log(f"generated-image colour accuracy {metrics['image_colour_accuracy']:.3f} "
         f"(chance {metrics['image_colour_chance']:.3f}; VAE reconstructions "
         f"{metrics['vae_reconstruction_colour_accuracy']:.3f})")
    _log(f"done in {metrics['seconds']['total'] / 60:.1f} min; report in {report_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
