"""What the PyTorch-vs-JAX benchmarks share: presets, arguments, threads, the torch model.

Each benchmark builds a random diffusers `SD3Transformer2DModel`, converts it with our
converter and times both on the same inputs, threads and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile

PRESETS = {
    # name: (layers, heads, head_dim, joint_attention_dim)
    "tiny": (2, 2, 32, 64),
    "small": (4, 4, 64, 512),
    "sd3-medium": (24, 24, 64, 4096),
}
POOLED_DIM = 2048


def add_common_arguments(p: argparse.ArgumentParser, default_batch: int) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--batch", type=int, default=default_batch)
    p.add_argument("--text-len", type=int, default=77, help="context tokens (256 in the release)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute and weight dtype of both models")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads for both frameworks (default: all cores)")
    p.add_argument("--json", default=None, help="also write the results here")


def fix_threads(threads: int) -> None:
    """Same thread count for XLA as for torch; must run before either framework starts."""
    os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true "
                                       f"intra_op_parallelism_threads={threads}")


def random_sd3(args, max_resolution: int):
    """(torch model on the benchmark device and dtype, device, torch dtype, folder holding
    the model in diffusers layout for our converter). Put TMPDIR on a RAM disk for big ones."""
    import diffusers
    import torch

    torch.set_num_threads(args.threads)
    layers, heads, head_dim, joint = PRESETS[args.preset]
    config = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=layers,
                  attention_head_dim=head_dim, num_attention_heads=heads,
                  joint_attention_dim=joint, caption_projection_dim=heads * head_dim,
                  pooled_projection_dim=POOLED_DIM, out_channels=16,
                  pos_embed_max_size=max(192, max_resolution // 16))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(**config).eval()
    folder = tempfile.TemporaryDirectory()
    model.save_pretrained(os.path.join(folder.name, "src"))
    return model.to(device, tdtype), device, tdtype, folder


def load_converted(folder, args, attention="auto"):
    """Our model converted from the torch one saved by `random_sd3`."""
    import jax.numpy as jnp

    import unialign_jax
    from unialign_convert.transformer import convert_transformer

    src, dst = os.path.join(folder.name, "src"), os.path.join(folder.name, "dst")
    if not os.path.exists(dst):
        convert_transformer(src, dst, dtype=args.dtype)
    return unialign_jax.load_transformer(dst, dtype=jnp.dtype(args.dtype),
                                         attention=attention)


def environment(device: str) -> dict:
    """Where the figures came from, for the JSON record."""
    import diffusers
    import jax
    import torch

    return {"jax_device": str(jax.devices()[0]), "torch_device": device,
            "torch_gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "machine": platform.processor() or platform.machine(),
            "versions": {"jax": jax.__version__, "torch": torch.__version__,
                         "diffusers": diffusers.__version__}}


def write_json(path: str | None, result: dict) -> None:
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
