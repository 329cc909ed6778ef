"""deqcore_models: DEQ models (MDEQ, DEQ-Transformer) for PyTorch and JAX, data, training, CLI.

From the bottom up: the models written once over ``xp`` (:mod:`~deqcore_models.mdeq`,
:mod:`~deqcore_models.transformer`), the data loaders (:mod:`~deqcore_models.data`), the model
families in one table (:mod:`~deqcore_models.families`), training (:mod:`~deqcore_models.train`),
the hypersolver library (:mod:`~deqcore_models.hyperdeq`), and the applications: the ``deqcore``
command (:mod:`~deqcore_models.cli`) and the experiments (:mod:`~deqcore_models.experiments`).
Importing this package imports neither torch nor jax; the framework-specific parts load on use.
"""
