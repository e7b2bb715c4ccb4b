"""Computes the alignment teacher's features with Qwen2.5-VL (transformers, PyTorch).

Spec section 2: the image feature is the vision tower's output tokens (after the patch
merger, `out_hidden_size` wide) for the clean target image, averaged; the text feature
is the LLM's input-embedding rows of the tokenised caption, pooled as `pool_text` says
("release": padded together with the batch, pads averaged in). The target image is the
one stored in the shards (already resized and cropped); Qwen's own image processor then
prepares it exactly as it would for the VLM. PyTorch is needed only here.

The processor is pinned to transformers' PIL backend on the stored uint8 pixels, so the
features do not change with whether torchvision happens to be installed. The release
(`train.py` `encode_img`) uses the torchvision ("fast") processor on float tensors
(`do_rescale=False`); same pixels, but its 512 → 504 resize keeps floats where this one
rounds to uint8 (torchvision's PyPI wheels need the CUDA build of torch, so that path is
not a dependency here; README, Fidelity).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from unialign_jax.data.build.teacher_precompute import pool_text


class QwenTeacher:
    """A local Qwen2.5-VL folder (weights, image processor, tokenizer), loaded offline."""

    def __init__(self, path: str, device: str = "cpu", dtype: str = "float32",
                 pooling: str = "release"):
        import torch
        from transformers import (AutoImageProcessor, AutoTokenizer,
                                  Qwen2_5_VLForConditionalGeneration)

        self.torch, self.device, self.name, self.pooling = torch, device, path, pooling
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, local_files_only=True, dtype=getattr(torch, dtype)).to(device).eval()
        self.image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True,
                                                                  backend="pil")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.dim = self.model.config.vision_config.out_hidden_size
        text_dim = self.model.get_input_embeddings().embedding_dim
        if text_dim != self.dim:
            raise ValueError(f"{path}: vision output {self.dim} != text embeddings {text_dim}")

    def image_features(self, pixels: list[np.ndarray]) -> np.ndarray:
        """(N, dim) mean of the merged vision tokens of each uint8 (H, W, 3) image."""
        inputs = self.image_processor(images=[Image.fromarray(p) for p in pixels],
                                      return_tensors="pt")
        with self.torch.no_grad():
            tokens = self.model.get_image_features(
                inputs["pixel_values"].to(self.device),
                inputs["image_grid_thw"].to(self.device)).pooler_output
        return np.stack([t.float().mean(0).cpu().numpy() for t in tokens])

    def text_features(self, texts: list[str]) -> np.ndarray:
        """(N, dim) pooled input-embedding rows of each text's tokens."""
        table = self.model.get_input_embeddings()
        with self.torch.no_grad():
            rows = [table(self.torch.tensor(self.tokenizer(t)["input_ids"], device=self.device)
                          ).float().cpu().numpy() for t in texts]
            pad = self.torch.tensor([self.tokenizer.pad_token_id], device=self.device)
            pad_row = table(pad)[0].float().cpu().numpy()
        return pool_text(rows, pad_row, self.pooling)
