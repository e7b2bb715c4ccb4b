"""`UniAlignPipeline`: the five tasks from Python, for notebooks and the command line.

Strings and PIL images (or arrays, or paths) in, PIL images and strings out. All input
checks happen first, so bad input fails before anything compiles. Work is split into
chunks of at most `batch_size` items (the last one padded, so every chunk reuses the same
compiled loops), each chunk split over the mesh's batch axes. Every item has its own
seed: an image depends on its prompt, inputs and seed, not on what it was batched with
(bit for bit at a fixed batch size; across batch sizes up to float rounding).

`UniAlignPipeline.from_pretrained(path)` (also `unialign_jax.load_pipeline`) loads a
converted pipeline folder, or a training work dir, with its weights placed on the mesh as
they are read.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from PIL import Image
from tqdm.auto import tqdm

from unialign_jax import files
from unialign_jax.checkpoints import lora_files, registry
from unialign_jax.runs import work_dir
from unialign_jax.checkpoints.io import CheckpointError
from unialign_jax.checkpoints.pipeline_folder import (COMPONENT_DIRS, PipelineComponents, PipelineIndex,
                                               load_components, write_scheduler)
from unialign_jax.models.runtime import Runtime
from unialign_jax.parallel import batch_ways, make_mesh, placed_on
from unialign_jax.parallel.placement import place_module, put
from unialign_jax.sampling.caption import ModelDenoiser, sample_caption
from unialign_jax.sampling.image_sampler import sample_images
from unialign_jax.diffusion import flow
from unialign_jax.images import RESIZE_MODES, bucket_size
from unialign_jax.models import lora
from unialign_jax.sampling.preprocess import (InputError, check_input_size, check_prompts,
                                              check_resolution, load_image, preprocess, to_pil)
from unialign_jax.text.tokenizer import decode, prompt_ids, tokenize



class _Recorded:
    """The default of `negative_prompt`: the one the pipeline records for its model
    (`TrainedWith`); None keeps meaning "no guidance"."""

    def __repr__(self) -> str:
        return "RECORDED"


RECORDED = _Recorded()
# Composition in the release uses up to 3 condition images (spec section 1).
MAX_CONDITION_IMAGES = 3
# Per-task defaults of the release's pipeline (modules/pipeline.py): text-to-image 28 Euler
# steps, editing (and perception, the same loop) and composition 50, guidance 7.0 for all;
# captions as its infer.py runs them (32 unmasking steps over 256 positions).
DEFAULT_STEPS = {"t2i": 28, "edit": 50, "perceive": 50, "compose": 50, "caption": 32}
DEFAULT_GUIDANCE = 7.0

# Called with (item index, output) as soon as an output exists, so that batch writers can
# save each chunk before the next one runs.
OnResult = Callable[[int, Any], None]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _call(graphdef, method: str, state, *args):
    """A module method under jit, cached per (module structure, method, shapes)."""
    return getattr(nnx.merge(graphdef, state), method)(*args)


@functools.partial(jax.jit, static_argnums=1)
def _noise(keys, shape):
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def _item_keys(seeds: Sequence[int], stream: int) -> jax.Array:
    """(B,) keys of one random stream (noise, VAE posterior of condition k, ...) per item."""
    return jnp.stack([jax.random.fold_in(jax.random.key(s), stream) for s in seeds])


def _seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """One seed per item: `seed + i` for an int, or the given list."""
    if isinstance(seed, (int, np.integer)):
        return [int(seed) + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise InputError(f"got {len(seeds)} seeds for {n} items")
    return seeds


def _check_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) \
            or num_steps < 1:
        raise InputError(f"num_steps must be a positive integer, got {num_steps!r}")


def chunk_size(num_items: int, batch_size: int, ways: int) -> int:
    """Items per compiled call: at most `batch_size`, rounded up to a multiple of `ways`."""
    size = max(1, min(batch_size, num_items))
    return -(-size // ways) * ways


class Caption(str):
    """A caption as the release decodes it (the whole sequence, VQA prompt included, `</s>`
    removed); `.answer` holds only the text generated after the prompt or prefix, `.ids`
    the whole id sequence."""

    answer: str
    ids: np.ndarray

    def __new__(cls, text: str, answer: str, ids: np.ndarray):
        obj = super().__new__(cls, text)
        obj.answer, obj.ids = answer, ids
        return obj


def _per_item(text: str | Sequence[str], n: int, what: str) -> list[str]:
    """One string per item: a lone string is repeated, a list must have length n."""
    texts = check_prompts([text] * n if isinstance(text, str) else text, what)
    if len(texts) != n:
        raise InputError(f"got {len(texts)} {what}s for {n} items")
    return texts


class UniAlignPipeline:
    """Text-to-image, editing, perception, composition and captioning with one model.

    Args:
      components: a `PipelineComponents` (transformer, t5, vae, tokenizer, scheduler dict
        with 'shift' and 'num_train_timesteps', mask_token_id, path, trained_with), as built
        by `unialign_jax.load_pipeline`.
      mesh: a `unialign_jax.parallel.make_mesh` mesh (default: every device on 'fsdp');
        each batch is split over data × fsdp and the weights and activations are placed by
        the logical-axis rules (FSDP), moved there in place unless loaded for this mesh
        (`from_pretrained` places them as they are read).
      batch_size: items per compiled call (rounded up to a multiple of the batch split).
      progress: show tqdm progress bars (in steps, over all items).

    Every task takes `seed` (an int: item i uses seed + i; or one seed per item) and
    `on_result(index, output)`, called as each output is ready. Sizes, the prompt length and
    the negative prompt default to what the model was trained with (`trained_with`: the
    release's 512 px, 256 tokens and infer.py's negative prompt for converted release
    folders; a run's resolution, prompt length and null prompt for its own pipelines).
    """

    def __init__(self, components: PipelineComponents, *, mesh: Mesh | None = None,
                 batch_size: int = 4, progress: bool = True):
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        self.components = components
        self.mesh = mesh if mesh is not None else make_mesh()
        self.batch_size = batch_size
        self.progress = progress
        if self.mesh.size > 1:
            for module in (components.transformer, components.t5, components.vae):
                place_module(module, self.mesh)
        cfg = components.transformer.config
        self.latent_channels = cfg.in_channels
        self.downsampling = components.vae.config.downsample_factor
        self.max_side = cfg.pos_embed_max_size * cfg.patch_size * self.downsampling
        self.shift = float(components.scheduler.get("shift", flow.INFERENCE_SHIFT))
        self.trained_with = components.trained_with
        # Prompts are padded to the length the model was trained with (the release's 256):
        # a model trained on short prompts degrades when its text stream is mostly padding.
        self.text_length = self.trained_with.text_length
        self.num_train_timesteps = int(components.scheduler.get("num_train_timesteps",
                                                                flow.NUM_TRAIN_TIMESTEPS))
        self.lora: dict | None = None  # the loaded LoRA: path, scale, merged, layers, ranks
        self._unload_lora: Callable[[], None] | None = None

    @classmethod
    def from_pretrained(cls, path: str, runtime: Runtime = Runtime(), *, vae_dtype=jnp.float32,
                        mesh: Mesh | None = None, step: int | None = None,
                        weights: str | None = None, **pipeline_kwargs) -> "UniAlignPipeline":
        """The pipeline of a converted folder (`unialign-convert pipeline`) or of a training
        work dir (`unialign-train --workdir`).

        `runtime`: how the transformer and T5 run (`models.runtime`: compute dtype, stored
        weights' dtype — bf16 halves memory —, attention kernel; `vae_dtype`: the VAE's
        compute dtype). Weights are read straight into their place on `mesh`
        (default: every device); `pipeline_kwargs` (`batch_size`, `progress`) go to the
        constructor. For a work dir: `step` (default: the latest checkpoint) and `weights`
        ("ema", the default when the run keeps an EMA, or "raw"); the frozen T5 / VAE and
        the tokenizer are the run's (`runs.work_dir`).
        """
        mesh = mesh if mesh is not None else make_mesh()
        runtime = placed_on(mesh, runtime)
        if work_dir.is_training_run(path):
            components = work_dir.load_run_components(path, runtime, vae_dtype=vae_dtype,
                                                      step=step, weights=weights)
        elif step is not None or weights is not None:
            raise InputError(f"{path} is a pipeline folder, not a training work dir: it has "
                             "no steps or EMA weights to choose from")
        else:
            components = load_components(path, runtime, vae_dtype=vae_dtype)
        return cls(components, mesh=mesh, **pipeline_kwargs)

    def save_pretrained(self, path: str, *, force: bool = False) -> None:
        """Writes the components as a pipeline folder (`from_pretrained` reads it back):
        each model in the dtype its weights have, the tokenizer with its pad token; a
        merged LoRA is saved as part of the weights."""
        if self.lora is not None and not self.lora["merged"]:
            raise InputError("an unmerged LoRA is loaded: unload it, or load it with "
                             "merge=True to save it into the weights")
        c = self.components
        with files.atomic_output_dir(path, force) as tmp:
            where = {k: os.path.join(tmp, v) for k, v in COMPONENT_DIRS.items()}
            dtypes = {}
            for kind, name, module in (("transformer", "transformer", c.transformer),
                                       ("t5", "text_encoder", c.t5), ("vae", "vae", c.vae)):
                dtypes[name] = str(jax.tree.leaves(nnx.state(module, nnx.Param))[0].dtype)
                registry.save_model(kind, module, where[name], dtypes[name])
            c.tokenizer.save_pretrained(where["tokenizer"])
            write_scheduler(tmp, c.scheduler)
            PipelineIndex(source=c.path, layout="saved", vocab_size=len(c.tokenizer),
                          trained_with=c.trained_with, mask_token_id=c.mask_token_id,
                          dtype=dtypes["transformer"], vae_dtype=dtypes["vae"]).write(tmp)

    # -- LoRA ---------------------------------------------------------------------------
    def load_lora(self, path: str, scale: float = 1.0, merge: bool = True) -> dict:
        """Applies a LoRA file to the transformer: ours (`unialign-convert export-lora`) or
        a diffusers / PEFT SD3 LoRA (`save_lora_weights`), its alpha / r as stored.

        `merge=True` adds scale·B·A into the kernels (no cost per call; rounded to the
        kernels' dtype); `merge=False` keeps the factors apart and applies them at every
        call (`models.lora.LoraLinear`). Either way `unload_lora()` restores the base
        exactly. Returns `self.lora`. A file that does not fit the model fails with every
        problem listed (InputError) and changes nothing."""
        if self.lora is not None:
            raise InputError(f"a LoRA is loaded already ({self.lora['path']}); call "
                             "unload_lora() first")
        transformer = self.components.transformer
        try:
            factors, summary = lora_files.read_lora(path, transformer)
        except CheckpointError as e:
            raise InputError(str(e)) from None
        if merge:
            kernels = lora.merge(transformer, factors, scale)
            self._unload_lora = lambda: lora.restore_kernels(transformer, kernels)
        else:
            layers = lora.wrap(transformer, factors, scale)
            if self.mesh.size > 1:
                place_module(transformer, self.mesh)
            self._unload_lora = lambda: lora.unwrap(transformer, layers)
        self.lora = {"path": os.path.abspath(path), "scale": float(scale), "merged": merge,
                     **summary}
        return self.lora

    def unload_lora(self) -> None:
        """Removes the loaded LoRA: the transformer's weights are the base's, bit for bit."""
        if self._unload_lora is None:
            raise InputError("no LoRA is loaded")
        self._unload_lora()
        self.lora = self._unload_lora = None

    # -- the five tasks -----------------------------------------------------------------
    def generate(self, prompts: str | Sequence[str], *,
                 negative_prompt: str | None | _Recorded = RECORDED, height: int | None = None,
                 width: int | None = None, num_steps: int = DEFAULT_STEPS["t2i"],
                 guidance_scale: float = DEFAULT_GUIDANCE, seed: int | Sequence[int] = 0,
                 on_result: OnResult | None = None) -> list[Image.Image]:
        """Text-to-image: one image per prompt (`negative_prompt=None`: no guidance; sizes
        default to the trained resolution)."""
        prompts = check_prompts(prompts)
        height = self.trained_with.resolution if height is None else height
        width = self.trained_with.resolution if width is None else width
        check_resolution(height, width, self.max_side)
        return self._diffuse(prompts, [[] for _ in prompts], [(width, height)] * len(prompts),
                             "crop", negative_prompt, num_steps, guidance_scale,
                             _seeds(seed, len(prompts)), on_result)

    def edit(self, images: Sequence[Any], instructions: str | Sequence[str], *,
             negative_prompt: str | None | _Recorded = RECORDED, resolution: int | None = None,
             resize: str = "crop", num_steps: int = DEFAULT_STEPS["edit"],
             guidance_scale: float = DEFAULT_GUIDANCE, seed: int | Sequence[int] = 0,
             on_result: OnResult | None = None) -> list[Image.Image]:
        """Edits each image by its instruction (one instruction may serve all images).

        `resize`: "crop" (the release: square `resolution`, short-side resize and centre
        crop), or keep the input's aspect — "fit" (resized into the nearest aspect bucket of
        about resolution² pixels) or "pad" (fitted inside it on grey); the output then has
        the bucket's size (`unialign_jax.images.ASPECT_BUCKETS`)."""
        images = self._images(images)
        return self.compose([[im] for im in images], instructions,
                            negative_prompt=negative_prompt, resolution=resolution,
                            resize=resize, num_steps=num_steps, guidance_scale=guidance_scale,
                            seed=seed, on_result=on_result)

    def perceive(self, images: Sequence[Any], instructions: str | Sequence[str],
                 **kwargs) -> list[Image.Image]:
        """Perception (depth, segmentation, ... drawn as an image): the editing path with an
        instruction that asks for the map, e.g. "Generate the depth map of this image"."""
        return self.edit(images, instructions, **kwargs)

    def compose(self, image_lists: Sequence[Sequence[Any]], instructions: str | Sequence[str],
                *, negative_prompt: str | None | _Recorded = RECORDED,
                resolution: int | None = None, resize: str = "crop",
                num_steps: int = DEFAULT_STEPS["compose"],
                guidance_scale: float = DEFAULT_GUIDANCE, seed: int | Sequence[int] = 0,
                on_result: OnResult | None = None) -> list[Image.Image]:
        """One output per list of condition images (1 to 3 each), following the instruction
        (`resize` as for `edit`; the first image of a list sets its output's aspect)."""
        lists = [self._images(images) for images in image_lists]
        if not lists:
            raise InputError("the list of condition-image lists is empty")
        for i, images in enumerate(lists):
            if len(images) > MAX_CONDITION_IMAGES:
                raise InputError(f"item {i} has {len(images)} condition images; the model "
                                 f"takes at most {MAX_CONDITION_IMAGES}")
        instructions = _per_item(instructions, len(lists), "instruction")
        sizes = [self.input_size(images[0], resolution, resize) for images in lists]
        for i, (images, size) in enumerate(zip(lists, sizes)):
            for k, image in enumerate(images):
                check_input_size(image, size, f"item {i} image {k}")
        return self._diffuse(instructions, lists, sizes, resize, negative_prompt, num_steps,
                             guidance_scale, _seeds(seed, len(lists)), on_result)

    def input_size(self, image: Image.Image, resolution: int | None, resize: str
                   ) -> tuple[int, int]:
        """(width, height) of the model input made from `image`: square for "crop", else its
        aspect bucket (of about `resolution`², default the trained resolution); checked
        against the model's position table."""
        resolution = self.trained_with.resolution if resolution is None else resolution
        if resize not in RESIZE_MODES:
            raise InputError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        check_resolution(resolution, resolution)
        size = ((resolution, resolution) if resize == "crop"
                else bucket_size(image.size, resolution))
        check_resolution(size[1], size[0], self.max_side)
        return size

    def caption(self, images: Sequence[Any], *, prompt: str | Sequence[str] | None = None,
                prefix: str | Sequence[str] | None = None, resolution: int | None = None,
                resize: str = "crop", length: int | None = None,
                num_steps: int = DEFAULT_STEPS["caption"],
                seed: int | Sequence[int] = 0, on_result: OnResult | None = None
                ) -> list[Caption]:
        """Captions (or, with a question as `prompt`, answers) by masked diffusion.

        As in the release, a VQA `prompt`'s tokens — with its `</s>` — stay fixed at the
        start of the sequence and the whole sequence is decoded. A `prefix` (not in the
        release) is fixed without its `</s>`, so the caption continues it. Each result's
        `.answer` is the text generated after the prompt or prefix. `resize` as for `edit`;
        `length`: token positions (default: the pipeline's `text_length`).
        """
        length = self.text_length if length is None else length
        images = self._images(images)
        sizes = [self.input_size(image, resolution, resize) for image in images]
        for i, (image, size) in enumerate(zip(images, sizes)):
            check_input_size(image, size, f"image {i}")
        _check_steps(num_steps)
        if prompt is not None and prefix is not None:
            raise InputError("give a VQA prompt or a caption prefix, not both")
        fixed = prompt if prefix is None else prefix
        texts_in = _per_item("" if fixed is None else fixed, len(images), "prompt")
        prefixes = self._prompt_tokens(texts_in, length, keep_eos=prefix is None)
        seeds = _seeds(seed, len(images))
        t5_def, t5_state = nnx.split(self.components.t5)
        tr_def, tr_state = nnx.split(self.components.transformer)
        tok = self.components.tokenizer
        texts: dict[int, Caption] = {}
        with self._bar(len(images) * num_steps, "caption") as bar:
            for idx, real in self._grouped_chunks(sizes):
                pixels = preprocess([images[i] for i in idx], sizes[idx[0]], resize)
                latents = self._encode_images(pixels, [seeds[i] for i in idx], stream=1)
                init = np.full((len(idx), length), self.components.mask_token_id, np.int32)
                for row, i in enumerate(idx):
                    init[row, :len(prefixes[i])] = prefixes[i]
                out = sample_caption(ModelDenoiser(t5_def, tr_def),
                                     (t5_state, tr_state, latents), self._shard(init),
                                     self._shard(_item_keys([seeds[i] for i in idx], 0)),
                                     mask_id=self.components.mask_token_id,
                                     num_steps=num_steps)
                ids = np.asarray(out.ids)
                for row, i in enumerate(idx[:real]):
                    texts[i] = Caption(decode(tok, ids[row:row + 1])[0],
                                       decode(tok, ids[row:row + 1, len(prefixes[i]):])[0],
                                       ids[row])
                    if on_result is not None:
                        on_result(i, texts[i])
                bar.update(real * num_steps)
        return [texts[i] for i in range(len(images))]

    def reconstruct(self, images: Sequence[Any], *, resolution: int | None = None,
                    seed: int | Sequence[int] = 0) -> list[Image.Image]:
        """Each image through the VAE and back (a posterior sample, decoded): what the
        latent space keeps of it."""
        images = self._images(images)
        resolution = self.trained_with.resolution if resolution is None else resolution
        check_resolution(resolution, resolution, self.max_side)
        seeds = _seeds(seed, len(images))
        out: dict[int, Image.Image] = {}
        for idx, real in self._chunks(list(range(len(images)))):
            latents = self._encode_images(preprocess([images[i] for i in idx], resolution),
                                          [seeds[i] for i in idx], stream=1)
            decoded = to_pil(self._module_call(self.components.vae, "decode", latents))
            out.update(zip(idx[:real], decoded[:real]))
        return [out[i] for i in range(len(images))]

    # -- shared machinery ---------------------------------------------------------------
    def _diffuse(self, prompts: list[str], condition_images: list[list[Image.Image]],
                 sizes: list[tuple[int, int]], resize: str,
                 negative_prompt: str | None | _Recorded, num_steps: int,
                 guidance_scale: float, seeds: list[int], on_result: OnResult | None
                 ) -> list[Image.Image]:
        """Flow sampling for every item, chunked by (number of condition images, size)."""
        _check_steps(num_steps)
        if negative_prompt is RECORDED:
            negative_prompt = self.trained_with.negative_prompt
        if negative_prompt is not None:
            check_prompts([negative_prompt], "negative prompt")
        negative = (None if negative_prompt is None
                    else self.encode_text([negative_prompt], batch=False))
        results: dict[int, Image.Image] = {}
        with self._bar(len(prompts) * num_steps, "sample") as bar:
            keys = [(len(c), size) for c, size in zip(condition_images, sizes)]
            for items, real in self._grouped_chunks(keys):
                count, (width, height) = keys[items[0]]
                item_seeds = [seeds[i] for i in items]
                conditions = [
                    self._encode_images(preprocess([condition_images[i][k] for i in items],
                                                   (width, height), resize),
                                        item_seeds, stream=1 + k)
                    for k in range(count)]
                latent_shape = (height // self.downsampling, width // self.downsampling,
                                self.latent_channels)
                noise = self._shard(_noise(_item_keys(item_seeds, 0), latent_shape))
                latents = sample_images(
                    self.components.transformer, noise,
                    self.encode_text([prompts[i] for i in items]), negative,
                    num_steps=num_steps, guidance_scale=guidance_scale, shift=self.shift,
                    conditions=conditions, num_train_timesteps=self.num_train_timesteps)
                decoded = to_pil(self._module_call(self.components.vae, "decode", latents))
                for i, image in zip(items[:real], decoded[:real]):
                    results[i] = image
                    if on_result is not None:
                        on_result(i, image)
                bar.update(real * num_steps)
        return [results[i] for i in range(len(prompts))]

    def encode_text(self, texts: Sequence[str], batch: bool = True) -> jax.Array:
        """(B, text_length, D) T5 states, padded with the tokenizer folder's pad token (as
        the release's pipeline does), no attention mask.

        `batch=False` keeps the result whole on every device (the one negative prompt)."""
        ids = self._shard(tokenize(self.components.tokenizer, list(texts), self.text_length), batch)
        return self._module_call(self.components.t5, "__call__", ids)

    def _encode_images(self, pixels: np.ndarray, seeds: list[int], stream: int) -> jax.Array:
        """VAE posterior samples, one key per item so that no result depends on its batch."""
        vae_def, vae_state = nnx.split(self.components.vae)
        return _encode_each(vae_def, vae_state, self._shard(pixels),
                            self._shard(_item_keys(seeds, stream)))

    def _prompt_tokens(self, prompts: list[str], length: int, keep_eos: bool = True
                       ) -> list[np.ndarray]:
        """Each prompt's fixed ids (unpadded, with its `</s>` unless `keep_eos` is False;
        none for an empty prompt); they must leave room to generate."""
        if length < 1:
            raise InputError(f"length must be at least 1, got {length}")
        vocab = self.components.transformer.config.vocab_size
        if not 0 <= self.components.mask_token_id < vocab:
            raise InputError(f"mask token id {self.components.mask_token_id} is outside the "
                             f"transformer's text vocabulary ({vocab})")
        out = []
        for p in prompts:
            ids = (prompt_ids(self.components.tokenizer, p, length + 1) if p
                   else np.zeros(0, np.int32))
            if p and not keep_eos:
                ids = ids[:-1] if ids[-1] == self.components.tokenizer.eos_token_id else ids
            if len(ids) >= length:
                raise InputError(f"the prompt {p[:40]!r}… fills all {length} positions; "
                                 "nothing would be left to generate")
            out.append(ids)
        return out

    def _images(self, images: Sequence[Any]) -> list[Image.Image]:
        if isinstance(images, (str, Image.Image, np.ndarray)):
            images = [images]
        images = [load_image(im) for im in images]
        if not images:
            raise InputError("the image list is empty")
        return images

    def _module_call(self, module: nnx.Module, method: str, *args) -> jax.Array:
        graphdef, state = nnx.split(module)
        return _call(graphdef, method, state, *args)

    def _chunks(self, items: list[int], total: int | None = None
                ) -> list[tuple[list[int], int]]:
        """(items, number of real ones) in chunks of one size for the whole call (`total`
        items), so all chunks share compiled loops; a short chunk repeats its last item."""
        size = chunk_size(total or len(items), self.batch_size, batch_ways(self.mesh))
        out = []
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            out.append((chunk + [chunk[-1]] * (size - len(chunk)), len(chunk)))
        return out

    def _grouped_chunks(self, keys: list) -> list[tuple[list[int], int]]:
        """`_chunks` within each group of items sharing a key (shape of the compiled call)."""
        return [chunk for key in sorted(set(keys))
                for chunk in self._chunks([i for i, k in enumerate(keys) if k == key],
                                          len(keys))]

    def _shard(self, x, batch: bool = True) -> jax.Array:
        """Batch arrays split over the mesh; `batch=False`: whole on every device."""
        return put(x, self.mesh, batch=batch) if self.mesh.size > 1 else jnp.asarray(x)

    def _bar(self, total: int, what: str):
        return tqdm(total=total, desc=what, unit="step", disable=not self.progress)


@functools.partial(jax.jit, static_argnums=0)
def _encode_each(vae_def, vae_state, pixels, keys):
    """One posterior sample per item, each from its own key; the encoder itself runs a few
    images at a time (`AutoencoderKL.posterior`), so a batch of 1024 px sources fits in the
    memory one image needs."""
    vae = nnx.merge(vae_def, vae_state)
    mean, logvar = vae.posterior(pixels)
    return jax.vmap(lambda m, lv, k: vae.sample_latents(m[None], lv[None], k)[0])(
        mean, logvar, keys)


def load_pipeline(path: str, runtime: Runtime = Runtime(), **kwargs) -> UniAlignPipeline:
    """`UniAlignPipeline.from_pretrained(path, runtime, **kwargs)`."""
    return UniAlignPipeline.from_pretrained(path, runtime, **kwargs)
