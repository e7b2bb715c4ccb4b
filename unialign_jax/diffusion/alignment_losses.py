"""The representation losses of UniAlignment training (spec section 4): contrastive and
teacher alignment. The two diffusion losses live with their processes in
`unialign_jax.diffusion`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

CONTRASTIVE_TEMPERATURE = 0.07


def _l2_normalise(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """torch.nn.functional.normalize: x / max(‖x‖, eps)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def contrastive_loss(image_hidden: jax.Array, text_hidden: jax.Array,
                     temperature: float = CONTRASTIVE_TEMPERATURE, groups: int = 1
                     ) -> jax.Array:
    """Symmetric InfoNCE between token-averaged image and text states (diagonal = pairs).

    `groups` > 1 splits the rows into that many consecutive groups, contrasts within each
    (the release contrasts within one GPU's micro-batch) and averages the groups' losses.
    """
    img = _l2_normalise(image_hidden.astype(jnp.float32).mean(1))
    txt = _l2_normalise(text_hidden.astype(jnp.float32).mean(1))
    b = img.shape[0]
    if b % groups:
        raise ValueError(f"{b} rows cannot be split into {groups} contrastive groups")
    img, txt = img.reshape(groups, b // groups, -1), txt.reshape(groups, b // groups, -1)
    logits = jnp.einsum("gid,gjd->gij", img, txt) / temperature

    def cross_entropy(lg):  # (G, n, n), labels on the diagonal
        return -jnp.diagonal(jax.nn.log_softmax(lg, -1), axis1=1, axis2=2).mean()

    return 0.5 * (cross_entropy(logits) + cross_entropy(logits.swapaxes(1, 2)))


def cosine_alignment_loss(projected: jax.Array, teacher: jax.Array,
                          eps: float = 1e-12) -> jax.Array:
    """1 − mean cosine similarity of L2-normalised rows (the release normalises both with
    `F.normalize`, eps 1e-12, then sums the products)."""
    a = _l2_normalise(projected.astype(jnp.float32), eps)
    b = _l2_normalise(teacher.astype(jnp.float32), eps)
    return 1.0 - (a * b).sum(-1).mean()
