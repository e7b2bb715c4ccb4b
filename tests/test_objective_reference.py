"""The training objective, end to end, against the release's own loss code.

The fixture folder (`UNIALIGN_OBJECTIVE_FIXTURE`, default ../shared/fixtures/
objective_reference) holds a tiny transformer and T5 in their released layouts, latents and
ids, every random draw, each loss term, the weighted total and the gradient of the total
for every transformer parameter, computed by the original PyTorch code (float32, CPU).
We convert both models with `unialign-convert`, replay the draws through
`training.objective.objective` — the function the train step calls — and compare.
Sizes, mask id, block depth and weights come from the fixture's JSON.
"""

import json
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from conftest import SHARED_FIXTURES

ENV = "UNIALIGN_OBJECTIVE_FIXTURE"
TERMS = ("loss_image", "loss_caption", "loss_contrastive", "loss_align_text",
         "loss_align_image", "loss")
TERM_RTOL = 1e-4
GRAD_TOL = 5e-4    # × max |reference gradient| of each tensor
NORM_RTOL = 1e-5


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    folder = os.environ.get(ENV)
    if folder is None:
        folder = os.path.join(SHARED_FIXTURES, "objective_reference")
        if not os.path.isdir(folder):
            pytest.skip(f"objective fixture {folder} is absent (../shared is not checked out "
                        f"next to the repository; set {ENV} to point at one)")
    elif not os.path.isdir(folder):
        pytest.fail(f"{ENV}={folder} is not a folder: point it at an objective_reference "
                    "fixture (objective_reference.json, .safetensors, transformer/, t5/)")
    from safetensors.numpy import load_file

    from unialign_convert.t5 import convert_t5
    from unialign_convert.transformer import convert_transformer
    from unialign_jax.checkpoints.registry import load_t5, load_transformer

    with open(os.path.join(folder, "objective_reference.json")) as f:
        meta = json.load(f)
    tensors = load_file(os.path.join(folder, "objective_reference.safetensors"))
    out = tmp_path_factory.mktemp("objective")
    convert_transformer(os.path.join(folder, "transformer"), str(out / "transformer"))
    convert_t5(os.path.join(folder, "t5"), str(out / "t5"))
    return {"meta": meta, "tensors": tensors,
            "transformer": load_transformer(str(out / "transformer"), jnp.float32,
                                            attention="xla"),
            "t5": load_t5(str(out / "t5"), jnp.float32, attention="xla")}


def nhwc(x):
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def replay(fixture, case):
    """(terms, gradients by diffusers name, global norm) of our objective on the case."""
    from unialign_convert.transformer_keys import tensor_moves
    from unialign_jax.training import objective
    from unialign_jax.runs.config import LossConfig

    meta, t = fixture["meta"], fixture["tensors"]
    weights = meta["weights"]
    cfg = LossConfig(image_weight=weights["image"], caption_weight=weights["caption"],
                     contrastive_weight=weights["contrastive"], align_weight=weights["align"],
                     block_depth=meta["block_depth"], null_prompt_prob=meta["null_prompt_prob"],
                     contrastive_temperature=meta["contrastive_temperature"],
                     caption_eps=meta["caption_eps"])
    get = lambda name: t[f"{case}.{name}"]  # noqa: E731
    latents = nhwc(get("latents"))
    inputs = objective.Inputs(
        latents=latents, caption_latents=latents,
        conditions=(nhwc(get("source_latents")),) if f"{case}.source_latents" in t else (),
        instruction_ids=jnp.asarray(get("instruction_ids")),
        caption_ids=jnp.asarray(get("caption_ids")),
        teacher_image=jnp.asarray(get("teacher_image")),
        teacher_text=jnp.asarray(get("teacher_text")))
    draws = objective.Draws(
        flow_logit_normal=jnp.asarray(get("flow_logit_normal")),
        flow_noise=nhwc(get("flow_noise")),
        null_prompt_uniform=jnp.asarray(get("null_prompt_uniform")),
        caption_time_uniform=jnp.asarray(get("caption_time_uniform")),
        caption_mask_uniform=jnp.asarray(get("caption_mask_uniform")))
    t5 = fixture["t5"]
    null_context = t5(jnp.asarray(t["null_ids"]))
    graphdef, params, rest = nnx.split(fixture["transformer"], nnx.Param, ...)

    def loss(params):
        model = nnx.merge(graphdef, params, rest)
        return objective.objective(model, t5, inputs, draws, null_context, cfg,
                                   meta["mask_id"])

    (_, terms), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    flat = nnx.to_pure_dict(grads)
    by_name = {}
    for move in tensor_moves(fixture["transformer"].config):
        node = flat
        for part in move.target:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if node is None:          # not a parameter (the fixed position table)
            continue
        g = np.asarray(node if move.layer is None else node[move.layer])
        if move.perm is not None:
            g = g.transpose(np.argsort(move.perm))
        by_name[move.source] = g
    norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                             for x in jax.tree.leaves(grads))))
    return {k: float(v) for k, v in terms.items()}, by_name, norm


@pytest.mark.parametrize("case", ["t2i", "edit"])
def test_objective_matches_the_release(fixture, case):
    meta, t = fixture["meta"], fixture["tensors"]
    if case not in meta["cases"]:
        pytest.skip(f"the fixture has no {case!r} case")
    terms, grads, norm = replay(fixture, case)
    for name in TERMS:
        want = meta["values"][case][name]
        assert abs(terms[name] - want) <= TERM_RTOL * abs(want), (name, terms[name], want)

    prefix = f"{case}.grad."
    reference = {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
    assert reference, "the fixture holds no gradients"
    missing = sorted(set(reference) - set(grads))
    assert not missing, f"parameters with a reference gradient we do not have: {missing}"
    worst = {}
    for name, ref in reference.items():
        ours = grads[name]
        assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
        scale = float(np.max(np.abs(ref)))
        err = float(np.max(np.abs(ours - ref)))
        worst[name] = err / max(scale, 1e-30)
        assert err <= GRAD_TOL * scale, (name, err, scale)
    # Parameters the release gives no gradient (unused by the objective) get none here.
    for name in set(grads) - set(reference):
        assert not np.any(grads[name]), name
    want = meta["values"][case]["grad_global_norm"]
    assert abs(norm - want) <= NORM_RTOL * want, (norm, want)
