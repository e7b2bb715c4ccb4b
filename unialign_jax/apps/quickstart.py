"""`unialign-quickstart`: UniAlignment from scratch on synthetic shapes, on a CPU, in minutes.

1. writes the synthetic corpus (`unialign-data synth`: coloured shapes with captions, colour
   edits, segmentation requests and compositions of two shapes from separate images),
   builds its training shards (`unialign-data build`)
   and precomputes stand-in teacher features into them (a fixed random projection in place
   of Qwen2.5-VL, written the way `unialign-data teacher` writes real ones), so all
   five losses train;
2. trains a tiny T5-layout tokenizer on its texts and fits a tiny VAE to its images (a
   random VAE could not decode generated latents back to colours; see `apps/vae_fit.py`);
   the T5 encoder stays random and frozen;
3. trains a tiny UniAlignment transformer on all three tasks (text-to-image, editing,
   composition) with the real trainer (the shipped config `quickstart`) — every
   --eval-every steps a held-out eval loss on held-out shards and validation samples of
   held-out prompts and inputs (WORKDIR/train/validation/STEP/) — and leaves it as a
   pipeline folder, WORKDIR/pipeline (`unialign-sample
   --ckpt WORKDIR/pipeline`, `unialign_jax.load_pipeline`);
4. evaluates on held-out samples through `UniAlignPipeline` — caption token accuracy of
   masked-diffusion captions continuing a fixed prefix (the ids all training captions start
   with, not scored) against the per-position majority-token baseline; the dominant
   colour of generated images against the prompt's colour (chance: 1/6) and their shape
   against the prompt's shape (chance: 1/3; `apps/shape_score.py`, whose own accuracy on the
   real renders is reported beside it); composition of held-out source pairs, scored by
   whether both source shapes (colour and kind) are present in the output
   (`shape_score.composition_score`) — and writes WORKDIR/report/: loss_curves.png (all
   five losses), eval_curves.png (the held-out eval losses while training), samples.png,
   compositions.png, captions.txt, report.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

from unialign_jax import compilation_cache

CONFIG = "quickstart"
PIPELINE_DIR = "pipeline"  # WORKDIR/pipeline: the trained model as a pipeline folder
# Shapes (source images) per composition: two, so that each keeps 8-14 px of a 32 px scene.
COMPOSE_SOURCES = 2
TASKS = ("t2i", "edit", "compose")
HELDOUT_FRACTION = 0.1  # of each task's synthetic samples, for evaluation
OPTIONS = (  # flag, default, meaning
    ("--samples", 3000, "synthetic samples per task, 10%% held out"),
    ("--vae-steps", 400, "VAE fitting steps"),
    ("--eval-samples", 288, "held-out prompts / images to evaluate"),
    ("--sample-steps", 28, "flow sampler steps (the release's text-to-image default)"),
    ("--guidance", 7.0, "guidance scale (the release's default)"),
    ("--caption-steps", 64, "masked-diffusion caption sampler steps"),
    ("--eval-every", 500, "steps between held-out eval losses and validation samples while "
                          "training (0: none)"),
)
# Validation items sampled while training (held-out prompts / inputs): per task, how many.
VALIDATION_ITEMS = {"t2i": 6, "edit": 2, "compose": 2}
# The eval curves of the report: every loss term over all held-out batches, then each
# task's image loss.
EVAL_CURVES = tuple(f"eval/{k}" for k in ("loss", "loss_image", "loss_caption",
                                          "loss_contrastive", "loss_align_text",
                                          "loss_align_image")) + tuple(
    f"eval/{task}/loss_image" for task in TASKS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unialign-quickstart", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/quickstart",
                   help="output folder (default ./runs/quickstart); rerunning resumes the "
                        "unfinished stages, and a finished run with the same settings is left "
                        "as it is")
    for flag, default, text in OPTIONS:
        p.add_argument(flag, type=type(default), default=default,
                       help=f"{text} (default %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="training config overrides, e.g. run.num_steps=300")
    compilation_cache.add_arguments(p)
    return p


def run_settings(args) -> dict:
    """Everything on the command line that decides what the quickstart makes (recorded in
    report.json: a rerun with the same settings finds the work done)."""
    return {"options": {flag: getattr(args, flag.lstrip("-").replace("-", "_"))
                        for flag, _, _ in OPTIONS}, "overrides": list(args.overrides)}


def final_losses(metrics_path: str) -> dict:
    """The loss terms of the run's last logged training step, as its metrics.jsonl holds
    them (also when this process resumed a run that had already finished)."""
    from unialign_jax.training.metrics import read_metrics

    rows = [r for r in read_metrics(metrics_path) if "loss" in r]
    return {k: v for k, v in rows[-1].items() if k.startswith("loss")} if rows else {}


def _log(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def prepare_data(root: str, n: int, resolution: int, teacher_dim: int) -> dict:
    """Synthetic corpus, tokenizer, shards with teacher features: each kept when complete."""
    from unialign_jax.data.build.jsonl import LineRules
    from unialign_jax.data.build.shards import BuildOptions, build
    from unialign_jax.data.build.synth import generate
    from unialign_jax.data.build.teacher_precompute import ProjectionTeacher, precompute
    from unialign_jax.data.format.teacher_features import is_precomputed
    from unialign_jax.files import read_json_or_none
    from unialign_jax.text.tokenizer import load_tokenizer

    synth, paths = os.path.join(root, "synth"), {}
    info = read_json_or_none(os.path.join(synth, "synth.json"))
    if info is None or info.get("compose_sources") != COMPOSE_SOURCES:  # none, or before compose
        _log(f"writing {n} synthetic samples per task")
        generate(synth, n, seed=0, size=resolution, heldout=HELDOUT_FRACTION,
                 compose_sources=COMPOSE_SOURCES, force=True)
    paths["tokenizer"] = os.path.join(root, "tokenizer")
    if not os.path.exists(os.path.join(paths["tokenizer"], "tokenizer_config.json")):
        make_tokenizer(paths["tokenizer"])
    teacher = ProjectionTeacher(teacher_dim, load_tokenizer(paths["tokenizer"]))
    # Training shards, and held-out ones for the eval loss while training.
    for kind, split in [(kind, split) for kind in TASKS for split in ("train", "heldout")]:
        name = kind if split == "train" else f"{kind}_heldout"
        out = paths[name] = os.path.join(root, "shards", name)
        if not os.path.exists(os.path.join(out, "summary.json")):
            build([os.path.join(synth, f"{kind}_{split}.jsonl")], out,
                  BuildOptions(kind=kind, resolution=resolution, image_format="raw",
                               records_per_shard=2000, threads=2,
                               lines=LineRules(compose_sources=COMPOSE_SOURCES)), force=True)
        if not is_precomputed(out):
            precompute(out, teacher)
    paths["synth"] = synth
    paths["validation"] = write_validation_prompts(synth, os.path.join(root, "validation.jsonl"))
    return paths


def write_validation_prompts(synth: str, path: str) -> str:
    """The first held-out items of each task as a `--prompts-file` .jsonl (prompt, and the
    source images of edits and compositions): what the run samples at every eval."""
    import itertools

    from unialign_jax.data.build.jsonl import LineRules, read_jsonl
    from unialign_jax.files import jsonl, write_text_if_changed

    items = []
    for kind, count in VALIDATION_ITEMS.items():
        lines = read_jsonl(os.path.join(synth, f"{kind}_heldout.jsonl"), kind,
                           LineRules(compose_sources=COMPOSE_SOURCES))
        for _, sample in itertools.islice(lines, count):
            items.append({"prompt": sample.instruction, "images": list(sample.images[:-1])})
    write_text_if_changed(path, jsonl(items))
    return path


def make_tokenizer(folder: str):
    """The quickstart's tokenizer, trained on `tokenizer_texts` and saved in `folder`.
    Padded with `</s>` at inference too: the tiny model is trained from scratch with `</s>`
    padding and knows nothing else (a real T5 folder keeps `<pad>`, as the release's
    pipeline does)."""
    from unialign_jax.text.tokenizer import train_tiny_tokenizer

    return train_tiny_tokenizer(tokenizer_texts(), folder, vocab_size=60, pad_token="</s>")


def tokenizer_texts(word_repeats: int = 20) -> list[str]:
    """The corpus' texts and each of their words alone, repeated: SentencePiece then keeps
    every word one piece (from the texts alone it spells "make the" letter by letter), so
    the longest text is 6 tokens instead of 18 and `data.max_length` can be 8."""
    from unialign_jax.data.build.synth import corpus_texts

    texts = corpus_texts()
    words = sorted({w for t in texts for w in t.split()})
    return texts + words * word_repeats


def read_split(synth: str, kind: str, split: str, limit: int | None = None):
    """[(pixels in [-1, 1] of every image — sources, then the target —, caption,
    instruction)] of a synth JSONL file, read by the shard builder's own line reader."""
    import itertools

    from PIL import Image

    from unialign_jax.data.build.faults import SkipSample
    from unialign_jax.data.build.jsonl import LineRules, read_jsonl
    from unialign_jax.images import to_model_range

    rows = []
    lines = read_jsonl(os.path.join(synth, f"{kind}_{split}.jsonl"), kind,
                       LineRules(compose_sources=COMPOSE_SOURCES))
    for where, sample in itertools.islice(lines, limit):
        if isinstance(sample, SkipSample):
            raise ValueError(f"{where}: {sample}")
        pixels = [to_model_range(np.asarray(Image.open(p).convert("RGB")))
                  for p in sample.images]
        rows.append((pixels, sample.caption, sample.instruction))
    return rows


def to_image(pixels: np.ndarray):
    """Pixels in [-1, 1] → a PIL image."""
    from PIL import Image

    return Image.fromarray(np.round((pixels + 1) * 127.5).astype(np.uint8))


def prepare_vae(root: str, synth: str, cfg, steps: int) -> tuple[str, dict]:
    from tqdm.auto import tqdm

    from unialign_jax.apps.vae_fit import fit_vae, save_vae
    from unialign_jax.files import read_json_or_none, write_json

    folder = os.path.join(root, "vae")
    info_path = os.path.join(root, "vae_fit.json")
    info = read_json_or_none(info_path)
    if info is not None:
        return folder, info
    images = np.stack([p[0] for p, _, _ in read_split(synth, "t2i", "train", 1024)])
    start = time.time()
    with tqdm(total=steps, desc="fit VAE", unit="step") as bar:
        vae, info = fit_vae(images, cfg.models.vae, steps=steps,
                            progress=lambda done, total: bar.update(1))
    save_vae(vae, folder, force=True)
    info["seconds"] = time.time() - start
    write_json(info_path, info)
    return folder, info


def cache_latents(folders: list[str], vae_path: str, cfg) -> None:
    """With data.cached_latents: the fitted VAE's posterior moments of every shard folder
    (what `unialign-data latents` writes), kept while that VAE made them."""
    from unialign_jax.checkpoints.registry import load_vae
    from unialign_jax.data.build.latent_precompute import precompute, vae_moments
    from unialign_jax.data.format.latent_cache import made_by, storage_dtype, vae_identity

    c = cfg.compute
    identity = vae_identity(vae_path, c.dtype, c.frozen_param_dtype)
    stale = [f for f in folders if made_by(f) != identity]
    if not stale:
        return
    import jax.numpy as jnp

    moments = vae_moments(load_vae(vae_path, jnp.dtype(c.dtype),
                                   param_dtype=jnp.dtype(c.frozen_param_dtype)))
    for folder in stale:
        precompute(folder, moments, identity, storage_dtype(c.dtype), vae_path=vae_path,
                   force=True)


def caption_accuracy(generated: np.ndarray, reference: np.ndarray, eos_id: int,
                     start: int = 0) -> float:
    """Token accuracy over each reference caption's tokens from `start` (the first position
    after the prefix) up to, not including, </s>."""
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


def trained_pipeline(result, cfg, tokenizer):
    """`UniAlignPipeline` over the run's EMA transformer and its frozen T5 / VAE."""
    from unialign_jax.apps.validation import pipeline_of

    return pipeline_of(result.models, result.state.ema_params, tokenizer, cfg, batch_size=32,
                       progress=True)


def evaluate(result, cfg, paths: dict, args) -> dict:
    from unialign_jax.apps.shape_score import shape_accuracy
    from unialign_jax.apps.validation import write_grid
    from unialign_jax.data.build.synth import PALETTE, SHAPES, dominant_colour
    from unialign_jax.text.tokenizer import load_tokenizer, tokenize

    tok = load_tokenizer(paths["tokenizer"])
    pipe = trained_pipeline(result, cfg, tok)
    heldout = read_split(paths["synth"], "t2i", "heldout", args.eval_samples)
    train_captions = [c for _, c, _ in read_split(paths["synth"], "t2i", "train", 1000)]
    images = [to_image(p[0]) for p, _, _ in heldout]
    captions = [c for _, c, _ in heldout]

    # Captions: masked diffusion conditioned on the image, continuing a fixed prefix — the
    # ids every training caption starts with. The text stream has no absolute positions
    # (T5's are relative), so from an all-mask start every position predicts the same
    # marginal and the first ids land at random places; the prefix anchors them. Prefix
    # positions are left out of every score below.
    length = cfg.data.max_length
    train_ids = tokenize(tok, train_captions, length)
    prefix = shared_prefix(train_ids)
    prefix_text = tok.decode(prefix)
    generated = pipe.caption(images, prefix=prefix_text, resolution=cfg.data.resolution,
                             length=length, num_steps=args.caption_steps, seed=1234)
    generated_ids = np.stack([c.ids for c in generated])
    reference = tokenize(tok, captions, length)
    baseline = majority_baseline(train_ids)

    # Images: text-to-image with guidance against the null prompt, scored by colour and by
    # shape (template matching, `apps/shape_score.py`; its accuracy on the real held-out
    # renders and on their VAE reconstructions is reported with it).
    decoded = pipe.generate(captions, negative_prompt=" ", height=cfg.data.resolution,
                            width=cfg.data.resolution, num_steps=args.sample_steps,
                            guidance_scale=args.guidance, seed=2)
    recon = pipe.reconstruct(images, resolution=cfg.data.resolution, seed=3)
    wanted = [c.split()[1] for c in captions]
    shapes = [c.split()[2] for c in captions]
    colour_hits = [dominant_colour(img) == w for img, w in zip(decoded, wanted)]
    recon_hits = [dominant_colour(img) == w for img, w in zip(recon, wanted)]

    report_dir = os.path.join(args.workdir, "report")
    write_grid(os.path.join(report_dir, "samples.png"), decoded[:24], captions[:24])
    from unialign_jax.files import write_text

    write_text(os.path.join(report_dir, "captions.txt"),
               "".join(f"{ref!r:32} -> {str(gen)!r}\n" for ref, gen in zip(captions, generated)))
    return {
        "heldout_samples": len(heldout),
        "caption_prefix": prefix_text,
        "caption_token_accuracy": caption_accuracy(generated_ids, reference, tok.eos_token_id,
                                                   len(prefix)),
        "caption_majority_baseline": caption_accuracy(
            np.broadcast_to(baseline, reference.shape), reference, tok.eos_token_id,
            len(prefix)),
        "caption_exact_match": float(np.mean([str(g).strip() == r
                                              for g, r in zip(generated, captions)])),
        "image_colour_accuracy": float(np.mean(colour_hits)),
        "image_colour_chance": 1.0 / len(PALETTE),
        "vae_reconstruction_colour_accuracy": float(np.mean(recon_hits)),
        "image_shape_accuracy": shape_accuracy(decoded, shapes),
        "image_shape_chance": 1.0 / len(SHAPES),
        "shape_scorer_accuracy_on_renders": shape_accuracy(images, shapes),
        "vae_reconstruction_shape_accuracy": shape_accuracy(recon, shapes),
        "caption_examples": [{"reference": r, "generated": str(g)}
                             for r, g in list(zip(captions, generated))[:8]],
        **evaluate_compose(pipe, cfg, paths, args),
    }


def evaluate_compose(pipe, cfg, paths: dict, args) -> dict:
    """Held-out compositions: both source shapes present in the output, against the
    scorer on the real targets and on their VAE reconstructions, and against copying the
    first source (its one shape)."""
    from unialign_jax.apps.shape_score import composition_score
    from unialign_jax.apps.validation import write_grid

    heldout = read_split(paths["synth"], "compose", "heldout", args.eval_samples)
    sources = [[to_image(p) for p in pixels[:-1]] for pixels, _, _ in heldout]
    targets = [to_image(pixels[-1]) for pixels, _, _ in heldout]
    scenes = [[tuple(part.split()[1:3]) for part in caption.split(" and ")]
              for _, caption, _ in heldout]
    composed = pipe.compose(sources, [instruction for _, _, instruction in heldout],
                            negative_prompt=" ", resolution=cfg.data.resolution,
                            num_steps=args.sample_steps, guidance_scale=args.guidance, seed=4)
    recon = pipe.reconstruct(targets, resolution=cfg.data.resolution, seed=5)
    write_grid(os.path.join(args.workdir, "report", "compositions.png"),
               [im for inputs, out in zip(sources, composed) for im in (*inputs, out)][:24],
               [label for _, caption, _ in heldout
                for label in ["source"] * COMPOSE_SOURCES + [caption]][:24],
               cols=COMPOSE_SOURCES + 1)
    score = composition_score(composed, scenes)
    return {"compose_heldout_samples": len(heldout),
            "compose_all_shapes_present": score["all_present"],
            "compose_shape_recall": score["shape_recall"],
            "compose_scorer_on_targets": composition_score(targets, scenes)["all_present"],
            "compose_vae_reconstruction": composition_score(recon, scenes)["all_present"],
            "compose_first_source_baseline": composition_score([s[0] for s in sources],
                                                               scenes)}


def eval_summary(rows: list[dict], train_seconds: float) -> dict:
    """The last eval's losses and what evaluating cost: the seconds of the eval losses and
    of the validation samples (first compiles included) against the training's own."""
    evals = [r for r in rows if "eval/loss" in r]
    spent = {k: sum(r.get(f"{k}/seconds", 0.0) for r in rows) for k in ("eval", "validation")}
    training = train_seconds - sum(spent.values())
    return {"steps": [r["step"] for r in evals],
            "last": {k: v for k, v in evals[-1].items()
                     if k.startswith("eval/") and k != "eval/seconds"} if evals else {},
            "seconds": spent, "training_seconds": training,
            "fraction_of_training": sum(spent.values()) / training}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    compilation_cache.setup_from_args(args)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import unialign_configs
    from unialign_jax import configlib
    from unialign_jax.files import read_json_or_none, write_json
    from unialign_jax.apps.validation import validation_of
    from unialign_jax.training.metrics import plot_losses, read_metrics
    from unialign_jax.training.trainer import train
    from unialign_convert.from_run import convert_run

    start = time.time()
    try:
        cfg = configlib.apply_overrides(unialign_configs.load(CONFIG), args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"unialign-quickstart: error: {e}", file=sys.stderr)
        return 2
    root = os.path.abspath(args.workdir)
    settings = run_settings(args)
    report_path = os.path.join(root, "report", "report.json")
    finished = read_json_or_none(report_path)
    if finished is not None and finished.get("settings") == settings:
        _log(f"already done with these settings: {report_path} (a new --workdir, or other "
             "settings, runs again)")
        return 0
    os.makedirs(root, exist_ok=True)
    paths = prepare_data(os.path.join(root, "data"), args.samples, cfg.data.resolution,
                         cfg.models.transformer.teacher_dim)
    vae_path, vae_info = prepare_vae(root, paths["synth"], cfg, args.vae_steps)
    _log(f"VAE: reconstruction MSE {vae_info['mse']:.4f}")
    if cfg.data.cached_latents:
        _log("caching the VAE posterior moments of every shard folder (data.cached_latents)")
        cache_latents([paths[task] for task in TASKS]
                      + [paths[f"{task}_heldout"] for task in TASKS if args.eval_every],
                      vae_path, cfg)
    cfg = dataclasses.replace(
        cfg, models=dataclasses.replace(cfg.models, tokenizer=paths["tokenizer"],
                                        vae_path=vae_path),
        data=dataclasses.replace(cfg.data, tasks={task: (paths[task],) for task in TASKS},
                                 eval_tasks={task: (paths[f"{task}_heldout"],)
                                             for task in TASKS if args.eval_every}),
        run=dataclasses.replace(cfg.run, eval_every=args.eval_every,
                                # a small corpus (--samples) holds fewer held-out records
                                # than one batch: the eval batch is what there is
                                eval_batch_size=min(cfg.run.eval_batch_size or cfg.run.batch_size,
                                                    int(round(args.samples * HELDOUT_FRACTION))),
                                validation_prompts=paths["validation"] if args.eval_every
                                else None))
    data_seconds = time.time() - start
    _log(f"training {cfg.run.num_steps} steps (batch {cfg.run.batch_size}) in {root}/train")
    result = train(cfg, os.path.join(root, "train"),
                   validation=validation_of(cfg, os.path.join(root, "train")))
    train_seconds = time.time() - start - data_seconds
    # What `load_pipeline` and `unialign-sample --ckpt` open (the work dir itself opens too).
    convert_run(os.path.join(root, "train"), os.path.join(root, PIPELINE_DIR), force=True)
    _log(f"pipeline folder (final EMA weights): {os.path.join(root, PIPELINE_DIR)}")
    _log("evaluating on held-out samples")
    metrics = evaluate(result, cfg, paths, args)
    report_dir = os.path.join(root, "report")
    plot_losses(os.path.join(root, "train", "metrics.jsonl"),
                os.path.join(report_dir, "loss_curves.png"))
    if args.eval_every:
        metrics["eval"] = eval_summary(read_metrics(os.path.join(root, "train",
                                                                  "metrics.jsonl")),
                                       train_seconds)
        plot_losses(os.path.join(root, "train", "metrics.jsonl"),
                    os.path.join(report_dir, "eval_curves.png"), EVAL_CURVES)
    metrics.update(settings=settings, steps=result.step,
                   final_losses=final_losses(os.path.join(root, "train", "metrics.jsonl")),
                   vae=vae_info,
                   seconds={"data_and_vae": data_seconds, "train": train_seconds,
                            "total": time.time() - start})
    write_json(os.path.join(report_dir, "report.json"), metrics)
    _log(f"caption token accuracy after the prefix {metrics['caption_prefix']!r}: "
         f"{metrics['caption_token_accuracy']:.3f} "
         f"(majority-token baseline {metrics['caption_majority_baseline']:.3f}, exact match "
         f"{metrics['caption_exact_match']:.3f})")
    _log(f"generated-image colour accuracy {metrics['image_colour_accuracy']:.3f} "
         f"(chance {metrics['image_colour_chance']:.3f}; VAE reconstructions "
         f"{metrics['vae_reconstruction_colour_accuracy']:.3f})")
    _log(f"generated-image shape accuracy {metrics['image_shape_accuracy']:.3f} "
         f"(chance {metrics['image_shape_chance']:.3f}; the scorer on the real renders "
         f"{metrics['shape_scorer_accuracy_on_renders']:.3f}, on their VAE reconstructions "
         f"{metrics['vae_reconstruction_shape_accuracy']:.3f})")
    _log(f"compositions with both source shapes present "
         f"{metrics['compose_all_shapes_present']:.3f} (shapes present "
         f"{metrics['compose_shape_recall']:.3f}; copying the first source "
         f"{metrics['compose_first_source_baseline']['all_present']:.3f}; the scorer on the "
         f"real targets {metrics['compose_scorer_on_targets']:.3f}, on their VAE "
         f"reconstructions {metrics['compose_vae_reconstruction']:.3f})")
    if args.eval_every:
        e = metrics["eval"]
        _log(f"eval while training at steps {e['steps']}: final held-out loss "
             f"{e['last'].get('eval/loss', float('nan')):.4f}; eval losses "
             f"{e['seconds']['eval']:.1f} s and validation samples "
             f"{e['seconds']['validation']:.1f} s, {100 * e['fraction_of_training']:.1f}% of "
             f"the training time (eval_curves.png, {root}/train/validation/)")
    _log(f"done in {metrics['seconds']['total'] / 60:.1f} min; report in {report_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
