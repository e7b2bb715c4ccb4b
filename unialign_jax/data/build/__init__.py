"""Making shard folders and what lies beside them: JSONL parsing, image fetching, skip
accounting, the shard builder, the teacher and latent precomputes, the synthetic corpus.
Writes `data/format/`; never imports the readers."""
