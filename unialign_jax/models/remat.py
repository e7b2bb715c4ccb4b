"""Rematerialisation policies by name: `jax.checkpoint_policies` plus sets of the block's
named intermediates (`jax.ad_checkpoint.checkpoint_name` tags in the joint block).

Saving a tensor costs memory for the whole backward pass; recomputing it costs FLOPs. The
named sets keep the expensive-to-recompute, cheap-to-store intermediates (the attention
output above all) and recompute the rest.
"""

from __future__ import annotations

from typing import Callable

import jax

# Tags in `mmdit_block.JointBlock`: q/k/v projections (both streams, joint sequence), the
# attention output before its projections, and the MLP hidden activations.
CHECKPOINT_NAMES = ("query", "key", "value", "attention", "mlp_hidden")

# Plain `jax.checkpoint_policies` (the others there are factories taking names).
GENERIC_POLICIES = ("everything_saveable", "nothing_saveable", "dots_saveable",
                    "dots_with_no_batch_dims_saveable")
NAMED_POLICIES = {
    "save_attention": ("attention",),
    "save_qkv_attention": ("query", "key", "value", "attention"),
    "save_attention_mlp": ("attention", "mlp_hidden"),
}


def remat_policy(name: str | Callable | None) -> Callable | None:
    """None or 'none': no rematerialisation; a `jax.checkpoint_policies` name; a name of
    `NAMED_POLICIES`; or a policy callable."""
    if name is None or callable(name):
        return name
    if name == "none":
        return None
    if name in NAMED_POLICIES:
        return jax.checkpoint_policies.save_only_these_names(*NAMED_POLICIES[name])
    if name not in GENERIC_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; choose 'none' or one of "
                         f"{sorted(GENERIC_POLICIES + tuple(NAMED_POLICIES))}")
    return getattr(jax.checkpoint_policies, name)
