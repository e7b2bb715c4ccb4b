"""Cached latents (`unialign-data latents`, `data.cached_latents`): the stored rows are the
VAE's posterior moments of each record's images; the train step on them draws the very
latents the encoding step draws (same keys), so its losses and update are the encoding
step's; a cache of another VAE, dtype or shard build, or a folder without one, is refused.
"""

import dataclasses
import json
import os
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from test_parallel_equivalence import edit_batch, tiny_config
from test_train_resume import _metrics, _train, corpus  # noqa: F401 — `corpus` is a fixture

# The objective takes the same moments and keys either way: one code path, so the same
# arithmetic; what the step adds is XLA fusing it with the rest of its graph.
STEP_TOLERANCE = 1e-6


def _tiny_models(cfg):
    from unialign_jax.parallel import make_mesh, replicated
    from unialign_jax.runs.builder import build_models
    from unialign_jax.training.step import FrozenModels, make_train_step

    mesh = make_mesh(devices=jax.devices()[:1])
    models = build_models(cfg.models, cfg.compute, mesh, None, seed=cfg.run.seed)
    frozen = FrozenModels.of(models, jax.device_put(np.ones((1, 8), np.int32), replicated(mesh)))
    trainer = make_train_step(models, frozen, mesh, optimizer=cfg.optimizer, loss=cfg.loss,
                              run=cfg.run, mask_id=63)
    return models, frozen, trainer


def _with_moments(batch: dict, moments) -> dict:
    """The batch as a cached-latents pipeline delivers it: moments in place of pixels."""
    out = {k: v for k, v in batch.items() if k not in ("target", "sources")}
    out["target_moments"] = np.asarray(moments(batch["target"]))
    if "sources" in batch:  # each source slot as one batch, as the step encodes them
        out["source_moments"] = np.stack([np.asarray(moments(batch["sources"][:, k]))
                                          for k in range(batch["sources"].shape[1])], axis=1)
    return out


@pytest.mark.parametrize("sources", [0, 1, 2])
def test_cached_moments_draw_the_encoders_latents(sources):
    """encode_images on moments = encode_images on pixels, bit for bit, and both are the
    posterior samples of the spec: to_latents(mean + σ·ε) with ε from fold_in(key, 0) for
    the image pass, 1 for a text-to-image caption pass, 2 + k for source k."""
    from flax import nnx

    from unialign_jax.models.vae import AutoencoderKL, VAEConfig
    from unialign_jax.training import objective

    vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 16), layers_per_block=1,
                                  norm_num_groups=4), rngs=nnx.Rngs(3))
    rng = np.random.default_rng(sources)
    batch = {"target": rng.uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)}
    if sources:
        batch["sources"] = rng.uniform(-1, 1, (3, sources, 16, 16, 3)).astype(np.float32)
    cached = _with_moments(batch, lambda x: np.concatenate(vae.posterior(jnp.asarray(x)), -1))
    assert not {"target", "sources"} & set(cached)
    assert ("source_moments" in cached) == bool(sources)
    key = jax.random.key(7)
    encoded = objective.encode_images(vae, batch, key)
    from_cache = objective.encode_images(vae, cached, key)
    for a, b in zip(jax.tree.leaves(encoded), jax.tree.leaves(from_cache)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def sample(moments, fold):
        mean, logvar = np.split(np.asarray(moments, np.float64), 2, axis=-1)
        eps = np.asarray(jax.random.normal(jax.random.fold_in(key, fold), mean.shape))
        cfg = vae.config
        return (mean + np.exp(0.5 * logvar) * eps - cfg.shift_factor) * cfg.scaling_factor

    latents, caption_latents, conditions = (jax.tree.map(np.asarray, x) for x in from_cache)
    np.testing.assert_allclose(latents, sample(cached["target_moments"], 0), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(caption_latents,
                               sample(cached["target_moments"], 0 if sources else 1),
                               rtol=1e-5, atol=1e-5)
    assert len(conditions) == sources
    for k, condition in enumerate(conditions):
        np.testing.assert_allclose(condition, sample(cached["source_moments"][:, k], 2 + k),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_step_on_cached_moments_equals_the_step_that_encodes(task):
    """The jitted train step (2 accumulated micro-batches, every loss term active) from one
    initial state: on the batch's pixels, and on the moments the cache writer computes of
    them (`latent_precompute.vae_moments`). The same draws: metrics and gradients agree to
    STEP_TOLERANCE of their scale, and so does the AdamW update (in units of lr) where the
    gradient fixes it — as `test_parallel_equivalence` compares meshes: the writer's
    encoder is another XLA program, whose convolutions round in their last float32 bit
    differently, and AdamW's first step turns a rounding difference in a near-zero gradient
    into a sizeable one of the update."""
    from test_parallel_equivalence import (_confident_update_diff, _first_moment_gradients,
                                           _max_relative_diff)
    from unialign_jax.data.build.latent_precompute import vae_moments

    cfg = tiny_config("run.micro_batch_per_device=8")
    models, frozen, trainer = _tiny_models(cfg)
    assert trainer.num_micro == 2
    batch = edit_batch()
    if task == "t2i":
        del batch["sources"]
    moments = vae_moments(models["vae"].module(), batch_size=8)
    init = jax.device_get(trainer.init().params)
    results = []
    for host in (batch, _with_moments(batch, moments)):
        state, metrics = trainer.step(trainer.init(), frozen, trainer.put_batch(host))
        results.append(jax.device_get((state, metrics)))
    (encoded, m_encoded), (cached, m_cached) = results
    for k in ("loss_image", "loss_caption", "loss_contrastive", "loss_align_image"):
        assert m_encoded[k] > 1e-3, (k, m_encoded)  # every term is active
    for k in m_encoded:
        assert abs(float(m_encoded[k]) - float(m_cached[k])) <= STEP_TOLERANCE * max(
            1.0, abs(float(m_encoded[k]))), (k, m_encoded[k], m_cached[k])
    b1, lr = cfg.optimizer.b1, float(m_encoded["lr"])
    grads = _first_moment_gradients(encoded, b1)
    assert _max_relative_diff(grads, _first_moment_gradients(cached, b1)) <= STEP_TOLERANCE
    assert _confident_update_diff(init, encoded.params, cached.params, grads, lr) \
        <= STEP_TOLERANCE
    # The step moved the parameters: the comparison is of a real update.
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(cached.params)))
    assert moved > 1e-4


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    """The `tiny` config's random VAE, saved as a converted folder (as models.vae_path)."""
    from unialign_jax.checkpoints.registry import save_model
    from unialign_jax.runs.builder import build_models
    from unialign_jax.parallel import make_mesh

    cfg = tiny_config()
    models = build_models(cfg.models, cfg.compute, make_mesh(devices=jax.devices()[:1]), None,
                          seed=cfg.run.seed)
    folder = str(tmp_path_factory.mktemp("vae") / "vae")
    save_model("vae", models["vae"].module(), folder)
    return folder


def _record_pixels(shards):
    """(records, K + 1, S, S, 3) model-range pixels of every record, sources then target."""
    from unialign_jax.data.format import stored_images
    from unialign_jax.data.format.records import decode_record
    from unialign_jax.data.read.shard_source import ShardSource
    from unialign_jax.images import to_model_range

    source = ShardSource([shards])
    return np.stack([np.stack([to_model_range(stored_images.decode_stored(
        blob, source.image_format, source.resolution))
        for blob in decode_record(source[i]["record"])[1]]) for i in range(len(source))])


class _Preempted(RuntimeError):
    pass


def test_latents_command_stores_each_records_moments_and_resumes(corpus, vae_folder):
    """`unialign-data latents` on an editing folder: a run stopped after its first batch
    resumes from it; every stored row is the VAE's moments of that record's image, computed
    alone; latents.json names the VAE; a second run is refused without --force."""
    from unialign_jax.checkpoints.registry import load_vae
    from unialign_jax.data import cli as data_cli
    from unialign_jax.data.build.latent_precompute import precompute, vae_moments
    from unialign_jax.data.format import latent_cache as latents

    shards = str(corpus["root"] / "edit")
    vae = load_vae(vae_folder)
    identity = latents.vae_identity(vae_folder, "float32", "float32")
    calls, moments = [], vae_moments(vae, batch_size=5)

    def preempted_after_one_batch(pixels):
        calls.append(len(pixels))
        if len(calls) == 4:  # shape probe, then a batch's targets and sources
            raise _Preempted("preempted")
        return moments(pixels)

    with pytest.raises(_Preempted):
        precompute(shards, preempted_after_one_batch, identity, "float32", batch_size=5)
    assert not latents.has_latents(shards)
    with open(os.path.join(shards, ".latents.partial", "progress.json")) as f:
        assert json.load(f)["done"] == 5
    assert data_cli.main(["latents", shards, "--vae", vae_folder, "--dtype", "float32",
                          "--param-dtype", "float32", "--batch-size", "5"]) == 0
    pixels = _record_pixels(shards)
    stored = {k: np.load(os.path.join(latents.latents_dir(shards), f"{k}.npy"))
              for k in ("target", "sources")}
    assert stored["target"].shape == (len(pixels), 8, 8, 32)
    assert stored["sources"].shape == (len(pixels), 1, 8, 8, 32)
    # float32, batches of 5 against one record at a time: XLA's CPU convolutions sum in
    # another order per batch size and per CPU (1.1e-6 apart seen on an Intel Xeon), so
    # atol 1e-5 on moments of magnitude ~0.1-1; a wrong record or image is off by ~0.1.
    for i, images in enumerate(pixels):
        alone = np.concatenate(vae.posterior(jnp.asarray(images)), -1)
        np.testing.assert_allclose(stored["sources"][i, 0], alone[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stored["target"][i], alone[1], rtol=1e-5, atol=1e-5)
    with open(os.path.join(latents.latents_dir(shards), latents.META)) as f:
        meta = json.load(f)
    assert meta["vae"] == identity and meta["vae_path"] == os.path.abspath(vae_folder)
    assert meta["resolution"] == 16 and meta["storage"] == "float32"
    assert data_cli.main(["latents", shards, "--vae", vae_folder]) == 2  # exists: --force


def test_bfloat16_moments_are_stored_losslessly(tmp_path):
    """Moments of a bfloat16 encoder are stored as bfloat16 words and read back exactly;
    values that are not bfloat16 are refused rather than rounded."""
    import ml_dtypes

    from unialign_jax.data.build.latent_precompute import LatentWriter
    from unialign_jax.data.format.latent_cache import LatentCache

    summary = {"records": 3, "resolution": 16, "num_sources": 0,
               "shards": [{"file": "a.array_record", "records": 3}]}
    rows = np.random.default_rng(0).normal(size=(3, 2, 2, 4)).astype(ml_dtypes.bfloat16)
    writer = LatentWriter(str(tmp_path), summary, {"id": 1}, (2, 2, 4), "bfloat16")
    with pytest.raises(ValueError, match="not bfloat16 values"):
        writer.append({"target": rows.astype(np.float32) + np.float32(1e-3)})
    writer.append({"target": rows.astype(np.float32)})
    writer.finish()
    cache = LatentCache(str(tmp_path), summary, {"id": 1})
    for i in range(3):
        got = cache.row(i)["target_moments"]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, rows[i].astype(np.float32))
    assert np.load(os.path.join(tmp_path, "latents", "target.npy")).dtype == np.uint16


def test_pipeline_reads_moments_in_place_of_pixels_and_refuses_other_caches(
        corpus, vae_folder, tmp_path):
    from unialign_jax.data import cli as data_cli
    from unialign_jax.data.format import latent_cache as latents
    from unialign_jax.data.read.grain_pipeline import PipelineConfig, training_iterator

    t2i, edit = str(corpus["root"] / "t2i"), str(corpus["root"] / "edit")
    for folder in (t2i, edit):
        if not latents.has_latents(folder):
            assert data_cli.main(["latents", folder, "--vae", vae_folder, "--dtype", "float32",
                                  "--param-dtype", "float32"]) == 0
    identity = latents.vae_identity(vae_folder, "float32", "float32")
    cfg = PipelineConfig(batch_size=4, tokenizer=str(corpus["root"] / "tokenizer"),
                         max_length=8, process_index=0, process_count=1, num_epochs=1, seed=3)
    corpora = {"t2i": [t2i], "edit": [edit]}
    plain = list(training_iterator(corpora, cfg))
    cached = list(training_iterator(corpora, dataclasses.replace(cfg, latents=identity)))
    stored = {folder: {k: np.load(os.path.join(latents.latents_dir(folder), f"{k}.npy"))
                       for k in ("target", "sources") if k != "sources" or folder == edit}
              for folder in (t2i, edit)}
    assert len(plain) == len(cached)
    assert {"sources" in a for a in plain} == {True, False}  # both tasks' batches
    for a, b in zip(plain, cached):
        assert set(b) == set(a) - {"target", "sources"} | (
            {"target_moments", "source_moments"} if "sources" in a else {"target_moments"})
        np.testing.assert_array_equal(a["index"], b["index"])   # same records, same order
        np.testing.assert_array_equal(a["caption_ids"], b["caption_ids"])
        rows = stored[edit if "sources" in a else t2i]
        np.testing.assert_array_equal(b["target_moments"], rows["target"][b["index"]])
        if "sources" in a:
            np.testing.assert_array_equal(b["source_moments"], rows["sources"][b["index"]])

    def refused(folders, identity, match):
        with pytest.raises(ValueError, match=match):
            training_iterator({"t2i": folders}, dataclasses.replace(cfg, latents=identity))

    refused([t2i], {**identity, "dtype": "bfloat16"},
            r"another VAE than this run's \(they differ in dtype")
    refused([t2i], {**identity, "weights_sha256": "0" * 64}, "another VAE")
    bare = str(tmp_path / "t2i_bare")
    assert data_cli.main(["build", "--jsonl", str(corpus["root"] / "synth" / "t2i_train.jsonl"),
                          "--kind", "t2i", "--out", bare, "--resolution", "16",
                          "--image-format", "raw", "--threads", "1"]) == 0
    refused([t2i, bare], identity, re.escape(f"{bare} has no cached latents"))
    # The same corpus rebuilt at another resolution: the cache is of the old build.
    rebuilt = str(tmp_path / "t2i_8px")
    assert data_cli.main(["build", "--jsonl", str(corpus["root"] / "synth" / "t2i_train.jsonl"),
                          "--kind", "t2i", "--out", rebuilt, "--resolution", "8",
                          "--image-format", "raw", "--threads", "1"]) == 0
    os.symlink(latents.latents_dir(t2i), latents.latents_dir(rebuilt))
    refused([rebuilt], identity, "computed for another build")


def test_cached_latents_need_the_runs_vae_folder():
    from unialign_jax import configlib
    from unialign_configs import load

    cfg = configlib.apply_overrides(load("tiny"), [
        "models.tokenizer=/tok", "data.tasks={'t2i': ('/s',)}", "data.cached_latents=True"])
    with pytest.raises(ValueError, match="data.cached_latents needs the VAE"):
        cfg.validate()


def test_training_on_cached_latents_logs_the_encoding_runs_losses(corpus, vae_folder,
                                                                  tmp_path):
    """`unialign-train` on text-to-image and editing shards, two steps, with the VAE folder:
    encoding in the step and reading the cache give the same logged losses and gradient
    norms (same draws); the cached run's logged FLOPs leave the VAE encoder out."""
    from unialign_jax.data import cli as data_cli
    from unialign_jax.data.format import latent_cache as latents

    for kind in ("t2i", "edit"):
        folder = str(corpus["root"] / kind)
        if not latents.has_latents(folder):
            assert data_cli.main(["latents", folder, "--vae", vae_folder, "--dtype", "float32",
                                  "--param-dtype", "float32"]) == 0
    runs = {}
    for name, extra in (("encode", ()), ("cached", ("data.cached_latents=True",))):
        _train(corpus, tmp_path / name, "run.num_steps=2", f"models.vae_path={vae_folder}",
               *extra)
        runs[name] = _metrics(tmp_path / name)
    assert [m["step"] for m in runs["cached"]] == [1, 2]
    for a, b in zip(runs["encode"], runs["cached"]):
        for k in ("loss", "loss_image", "loss_caption", "loss_contrastive", "grad_norm"):
            assert abs(a[k] - b[k]) <= STEP_TOLERANCE * max(1.0, abs(a[k])), (k, a[k], b[k])
    # Model FLOPs per sample of the cached run: the t2i / edit mean without the encoder.
    from unialign_configs import load
    from unialign_jax.text.tokenizer import load_tokenizer
    from unialign_jax.training import flops

    cfg = load("tiny")
    transformer = dataclasses.replace(cfg.models.transformer, vocab_size=len(load_tokenizer(
        str(corpus["root"] / "tokenizer"))))
    per_sample = [flops.sample_flops(transformer, cfg.models.t5, cfg.models.vae, flops.StepShape(
        cfg.data.resolution, cfg.data.max_length, edits, encodes_images=False))
        for edits in (0, 1)]
    assert all(p["vae"] == 0 for p in per_sample)
    with open(tmp_path / "cached" / "metrics.jsonl") as f:
        for row in map(json.loads, f):
            np.testing.assert_allclose(row["model_tflops_per_chip"], row["samples_per_s"] * (
                per_sample[0]["total"] + per_sample[1]["total"]) / 2 / 1e12, rtol=1e-9)


def test_bench_train_times_both_latent_modes(tmp_path):
    """scripts/bench_train.py --latents encode cached: one row per mode, the cached row's
    FLOPs without the VAE encoder, and the encode / cached ratio of the interleaved timings
    (null when the machine was too busy to say). No timing is checked."""
    import subprocess
    import sys

    from test_train_flops import tiny_preset_flops
    from unialign_jax.training import flops

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(repo, "scripts", "bench_train.py"), "--preset", "tiny",
         "--resolution", "32", "--iters", "1", "--repeats", "1", "--no-torch", "--task", "edit",
         "--latents", "encode", "cached", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["latents"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"encode", "cached"}
    for mode, row in rows.items():
        want = tiny_preset_flops(flops.StepShape(32, 16, 1,
                                                 encodes_images=mode == "encode"))
        np.testing.assert_allclose(row["model_tflop_per_sample"], want / 1e12, rtol=1e-12)
        if row["warnings"]:
            assert row["encode_over_cached"] is None
        else:
            assert row["encode_over_cached"] == pytest.approx(
                rows["encode"]["step_s"]["median"] / rows["cached"]["step_s"]["median"])
