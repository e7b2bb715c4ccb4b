"""Text side: the T5 tokenizer as the release uses it."""
