"""The entry point: ``[project.entry-points.deqcore] krylov = "deqcore_krylov._plugin"``.

deqcore loads this module on first use of its registry and calls the hooks below; they only
register classes (nothing heavy is imported here).
"""

from __future__ import annotations

from typing import Any

from deqcore.extend import hookimpl

from ._implicit_gmres import ImplicitGMRES
from ._newton_krylov import NewtonKrylov


@hookimpl
def deqcore_register_solvers(register: Any) -> None:
    register(NewtonKrylov.name, NewtonKrylov)


@hookimpl
def deqcore_register_gradients(register: Any) -> None:
    register(ImplicitGMRES.name, ImplicitGMRES)
