"""Precomputes the Qwen2.5-VL alignment-teacher features of built shard folders.

    python scripts/precompute_teacher.py --model /models/Qwen2.5-VL-7B-Instruct
        --shards /data/t2i_shards /data/edit_shards --device cuda --dtype bfloat16

For every record: the mean of the vision tower's merged output tokens for the stored
target image, and the mean of the LLM input-embedding rows of the caption (spec section
2), written to SHARDS/teacher/. Captions are pooled as the release pools them by default
(`--pooling release`: each batch of --batch-size captions padded together, pads averaged
in; the release pads its local batch of 48), or each on its own (`--pooling clean`). The
Grain pipeline then yields them as `teacher_image` and `teacher_text`. Interrupted runs
resume; needs PyTorch and transformers, offline.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from unialign_jax.data.teacher import POOLINGS, RELEASE_TEXT_BATCH, precompute
from unialign_jax.data.teacher_qwen import QwenTeacher


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="local Qwen2.5-VL folder (weights, preprocessor, tokenizer)")
    parser.add_argument("--shards", nargs="+", required=True, metavar="DIR",
                        help="shard folders built by `unialign-data build`")
    parser.add_argument("--batch-size", type=int, default=RELEASE_TEXT_BATCH,
                        help="records per forward, and captions padded together "
                             "(default %(default)s, the release's local batch)")
    parser.add_argument("--pooling", choices=POOLINGS, default="release",
                        help="text-feature pooling (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="model weights' dtype (float32); features are stored as float16")
    parser.add_argument("--force", action="store_true", help="recompute existing features")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        teacher = QwenTeacher(args.model, device=args.device, dtype=args.dtype,
                              pooling=args.pooling)
        results = {d: precompute(d, teacher, args.batch_size, args.force) for d in args.shards}
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"precompute_teacher: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
