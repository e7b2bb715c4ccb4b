"""Flax NNX models: the MMDiT transformer, the T5 encoder and the SD3 VAE."""
