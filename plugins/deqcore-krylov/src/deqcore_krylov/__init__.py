"""deqcore-krylov: a Newton-Krylov forward solver and a GMRES adjoint for deqcore.

Installing the distribution registers, through the ``deqcore`` entry-point group:

- the solver ``"newton_krylov"`` (:class:`NewtonKrylov`): ``deqcore.solve(f, x, solver="newton_krylov")``;
- the gradient mode ``"implicit_gmres"`` (:class:`ImplicitGMRES`):
  ``deqcore.solve(f, x, grad="implicit_gmres", grad_options={"tol": 1e-8})``.

Both are written once over deqcore's backend protocol and run on every backend (PyTorch, JAX).
Importing this package imports no array framework.
"""

from ._gmres import GMRESResult, gmres
from ._implicit_gmres import ImplicitGMRES
from ._newton_krylov import NewtonKrylov, NewtonKrylovState

__version__ = "0.1.0"

__all__ = ["GMRESResult", "ImplicitGMRES", "NewtonKrylov", "NewtonKrylovState", "__version__", "gmres"]
