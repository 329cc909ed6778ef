"""deqcore_models: DEQ models (MDEQ, DEQ-Transformer) for PyTorch and JAX, data, training, CLI.

Importing this package imports neither torch nor jax; the framework-specific parts load on use.
"""
