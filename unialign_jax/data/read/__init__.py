"""Shard folders (and prepared TFDS datasets) → training batches: random-access sources, the
Grain pipeline and the batch spec. Reads `data/format/`; never imports the builders."""
