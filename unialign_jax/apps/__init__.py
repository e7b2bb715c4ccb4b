"""Applications built on the library: the CPU quickstart (with its VAE fitting) and the
SemGen-Bench runner. Nothing in the library imports them."""
