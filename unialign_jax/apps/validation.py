"""Validation samples while training: `run.validation_prompts` sampled every
`run.eval_every` steps with the run's current weights, into WORKDIR/validation/STEP/.

The trainer (`training/`) cannot import the samplers (`sampling/` sits beside it on the same
floor, tests/test_layering.py), so this top-floor module joins them: `validation_of(cfg,
workdir)` reads and checks the prompts file before training starts (the reader of
`unialign-sample --prompts-file`), and the trainer calls the result at every eval with the
transformer's parameters (EMA when kept) and its SplitModels. It samples through
`UniAlignPipeline` over the trainer's own modules and mesh — the run's frozen T5 and VAE,
its tokenizer and prompt length, nothing loaded or copied — as the quickstart samples after
training (`pipeline_of`). Every process samples (the weights are spread over all of
them); the main process writes NNNNN.png per item, grid.png and validation.json (the
settings and each item's prompt, inputs and seed), and the images go to TensorBoard.

Item i of the file samples with its own "seed" or with seed i, so every validation of a
run starts from the same noise and the images change only with the weights.
"""

from __future__ import annotations

import os

from unialign_jax import files
from unialign_jax.sampling.jobs import read_prompts_file
from unialign_jax.sampling.unialign_pipeline import DEFAULT_STEPS, MAX_CONDITION_IMAGES, UniAlignPipeline
from unialign_jax.sampling.preprocess import InputError, check_input_size, load_image

VALIDATION_DIR = "validation"
SETTINGS_FILE = "validation.json"
GRID_FILE = "grid.png"


def pipeline_of(models: dict, params: dict, tokenizer, cfg, **pipeline_kwargs
                ) -> UniAlignPipeline:
    """`UniAlignPipeline` over a training run's own modules: its transformer with `params`
    (EMA or raw, as the state holds them), its frozen T5 and VAE and `tokenizer`, sampled
    with what it trains with (prompt length, resolution, null prompt as the negative one);
    `cfg` is the run's (resolved) `TrainConfig`."""
    from unialign_jax.checkpoints.pipeline_folder import PipelineComponents
    from unialign_jax.runs.work_dir import run_trained_with, scheduler_of
    from unialign_jax.text.tokenizer import mask_token_id

    components = PipelineComponents(
        transformer=models["transformer"].module(params), t5=models["t5"].module(),
        vae=models["vae"].module(), tokenizer=tokenizer, scheduler=scheduler_of(cfg),
        mask_token_id=mask_token_id(tokenizer), path="<training run>",
        trained_with=run_trained_with(cfg))
    return UniAlignPipeline(components, **pipeline_kwargs)


def read_items(path: str, resolution: int) -> list[dict]:
    """The items of a prompts file ({'prompt', 'images': [paths], 'seed'}), checked as the
    sampler will check them at `resolution`, with their images loaded; a ValueError
    (InputError) naming the first bad item — before training starts, not at its first
    eval."""
    prompts, file_items = read_prompts_file(path)
    items = [{"prompt": p, "images": [], "seed": None} for p in prompts] + file_items
    if not items:
        raise InputError(f"run.validation_prompts {path} holds no prompt")
    for i, item in enumerate(items):
        where = f"run.validation_prompts {path}, item {i}"
        if not isinstance(item["prompt"], str) or not item["prompt"].strip():
            raise InputError(f"{where}: no prompt")
        if len(item["images"]) > MAX_CONDITION_IMAGES:
            raise InputError(f"{where}: {len(item['images'])} condition images; the model "
                             f"takes at most {MAX_CONDITION_IMAGES}")
        if item["seed"] is None:
            item["seed"] = i
        item["loaded"] = [load_image(p) for p in item["images"]]
        for k, image in enumerate(item["loaded"]):
            check_input_size(image, (resolution, resolution), f"{where}: image {k}")
    return items


class PromptValidation:
    """The trainer's validation hook (`training.evaluation.Validation`) for one run."""

    def __init__(self, cfg, workdir: str):
        from unialign_jax.runs.resolve import resolve
        from unialign_jax.runs.work_dir import run_trained_with
        from unialign_jax.text.tokenizer import load_tokenizer

        self.cfg = resolve(cfg)
        self.workdir = workdir
        self.items = read_items(cfg.run.validation_prompts, self.cfg.data.resolution)
        self.tokenizer = load_tokenizer(self.cfg.models.tokenizer)
        run = self.cfg.run
        self.settings = {
            "prompts_file": os.path.abspath(run.validation_prompts),
            "weights": "raw" if self.cfg.optimizer.ema_decay is None else "ema",
            "guidance": run.validation_guidance,
            "negative_prompt": (run_trained_with(self.cfg).negative_prompt
                                if run.validation_negative_prompt is None
                                else run.validation_negative_prompt),
            "resolution": self.cfg.data.resolution}

    def steps(self, task: str) -> int:
        return self.cfg.run.validation_steps or DEFAULT_STEPS[task]

    def sample(self, pipe: UniAlignPipeline) -> list:
        """One image per item: text-to-image for items without images, composition (one
        image: editing) for the others."""
        s, items, out = self.settings, self.items, [None] * len(self.items)
        common = dict(negative_prompt=s["negative_prompt"], guidance_scale=s["guidance"])

        def keep(chosen):
            return lambda i, image: out.__setitem__(chosen[i], image)

        plain = [i for i, it in enumerate(items) if not it["images"]]
        if plain:
            pipe.generate([items[i]["prompt"] for i in plain], height=s["resolution"],
                          width=s["resolution"], num_steps=self.steps("t2i"),
                          seed=[items[i]["seed"] for i in plain], on_result=keep(plain),
                          **common)
        conditioned = [i for i, it in enumerate(items) if it["images"]]
        if conditioned:
            pipe.compose([items[i]["loaded"] for i in conditioned],
                         [items[i]["prompt"] for i in conditioned],
                         resolution=s["resolution"], num_steps=self.steps("compose"),
                         seed=[items[i]["seed"] for i in conditioned],
                         on_result=keep(conditioned), **common)
        return out

    def __call__(self, step: int, params: dict, models: dict, mesh, writer) -> None:
        pipe = pipeline_of(models, params, self.tokenizer, self.cfg, mesh=mesh,
                           batch_size=len(self.items), progress=False)
        images = self.sample(pipe)
        writer.write_images(step, {f"validation/{i:05d}": im for i, im in enumerate(images)})
        if not writer.enabled:
            return
        folder = os.path.join(self.workdir, VALIDATION_DIR, str(step))
        records = []
        for i, (item, image) in enumerate(zip(self.items, images)):
            files.save_png(image, os.path.join(folder, f"{i:05d}.png"))
            records.append({"file": f"{i:05d}.png", "prompt": item["prompt"],
                            "images": [os.path.abspath(p) for p in item["images"]],
                            "seed": item["seed"],
                            "steps": self.steps("compose" if item["images"] else "t2i")})
        write_grid(os.path.join(folder, GRID_FILE), images,
                   [item["prompt"] for item in self.items])
        files.write_json(os.path.join(folder, SETTINGS_FILE),
                         {"step": step, **self.settings, "items": records})


def validation_of(cfg, workdir: str) -> PromptValidation | None:
    """The validation hook of a run (None without `run.validation_prompts`)."""
    return PromptValidation(cfg, workdir) if cfg.run.validation_prompts else None


def write_grid(path: str, images, labels: list[str], scale: int | None = None,
               cols: int = 6) -> None:
    """Images (upscaled `scale` times, nearest; default: to at least 96 px) in a grid, each
    with its label underneath."""
    from PIL import Image, ImageDraw

    rows = -(-len(images) // cols)
    side = images[0].size[0] * (scale or max(1, 96 // images[0].size[0]))
    cell_h = side + 14
    grid = Image.new("RGB", (min(cols, len(images)) * side, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (img, label) in enumerate(zip(images, labels)):
        x, y = (i % cols) * side, (i // cols) * cell_h
        grid.paste(img.resize((side, side), Image.NEAREST), (x, y))
        draw.text((x + 2, y + side + 1), label[:18], fill=(0, 0, 0))
    files.save_png(grid, path)
