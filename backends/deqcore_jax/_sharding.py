"""Solves over a JAX device mesh with one solver loop per device (``jax.shard_map``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import deqcore
from deqcore import Solution
from deqcore.extend import SOLUTION_DATA_FIELDS, SOLUTION_META_FIELDS

_PER_SAMPLE = ("abs_residual", "rel_residual", "converged", "status", "iterations")
_TRACES = ("abs_trace", "rel_trace")


@dataclasses.dataclass(frozen=True)
class ShardedSolution(Solution):
    """The :class:`deqcore.Solution` of :func:`solve_per_shard`, with the per-shard counters.

    Per-sample fields (``z``, residuals, ``status``, ``iterations``, traces) are those of the
    whole batch, sharded over the mesh axis as the input was. ``nfe`` and ``steps`` are the
    largest over the shards, which is what one loop over the whole batch reports (it runs until
    the slowest sample anywhere stops). In ``solver_state`` a leaf with a batch axis is the whole
    batch's; a scalar leaf (a solver's step counter) has one entry per shard.

    Attributes:
        shard_nfe: (shards,) int, the batched evaluations of ``f`` each shard's loop ran.
        shard_steps: (shards,) int, the loop steps each shard ran.
    """

    shard_nfe: Any = None
    shard_steps: Any = None


jax.tree_util.register_dataclass(
    ShardedSolution,
    data_fields=[*SOLUTION_DATA_FIELDS, "shard_nfe", "shard_steps"],
    meta_fields=SOLUTION_META_FIELDS,
)


def solve_per_shard(
    f: Callable[[Any, Any], Any],
    x: Any,
    z0: Any = None,
    *,
    mesh: Mesh,
    axis: str | tuple[str, ...] = "batch",
    **options: Any,
) -> ShardedSolution:
    """:func:`deqcore.solve` with the batch split over ``mesh``'s ``axis`` and one solver loop
    per shard, run by ``jax.shard_map``.

    Under ``jax.jit`` with the batch sharded (``NamedSharding(mesh, P(axis))``), a plain
    ``deqcore.solve`` runs one loop for the whole batch: its stop test reduces over every device
    each iteration, and every device iterates until the slowest sample anywhere has stopped.
    Here each device runs its own loop on its own samples and stops when they have, with no
    communication inside the loop. Samples stop independently in both, so ``z``, residuals,
    ``status``, ``iterations`` and gradients are the same as the whole-batch solve's (to
    rounding in the reductions); only the work differs.

    Gradients work as for ``deqcore.solve``, in every gradient mode: arrays ``f`` closes over
    (parameters traced by ``jax.grad``) are replicated on the mesh and get gradients summed over
    the shards, as data-parallel training needs. Works inside and outside ``jax.jit``.

    Args:
        f: the layer ``f(z, x)``, as for :func:`deqcore.solve`; it sees one shard of the batch.
        x: the input injection: an array, a tuple of arrays or None. Every array's axis 0 is the
            batch, split over the mesh axis.
        z0: the initial state (default zeros with the structure of ``x``), batch on axis 0.
        mesh: the :class:`jax.sharding.Mesh` to run on.
        axis: the mesh axis (or tuple of axes) the batch is split over. The batch size must be
            a multiple of the number of shards.
        **options: every other option of :func:`deqcore.solve` (``solver``, ``tol``,
            ``max_iter``, ``grad``, the solver's own options, ...), applied per shard.
            ``backend`` is ``"jax"``; ``batched=False`` is an error (there is no batch to split).

    Returns:
        A :class:`ShardedSolution`: a :class:`deqcore.Solution` of the whole batch whose
        ``nfe`` and ``steps`` are the largest over the shards, with the per-shard values in
        ``shard_nfe`` and ``shard_steps``.
    """
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    if not isinstance(mesh, Mesh):
        raise TypeError(f"deqcore_jax.solve_per_shard: mesh must be a jax.sharding.Mesh, got "
                        f"{type(mesh).__name__}")
    unknown = [a for a in names if a not in mesh.axis_names]
    if not names or unknown:
        raise ValueError(f"deqcore_jax.solve_per_shard: axis {axis!r} is not an axis of the mesh "
                         f"(its axes: {', '.join(map(str, mesh.axis_names))})")
    if options.get("backend", "jax") != "jax":
        raise ValueError(f"deqcore_jax.solve_per_shard runs on the JAX backend; got "
                         f"backend={options['backend']!r}")
    if options.get("batched", True) is not True:
        raise ValueError("deqcore_jax.solve_per_shard splits the batch axis over the mesh; "
                         "batched=False has no batch to split (use deqcore.solve)")
    if options.get("correction_states", 0):
        raise ValueError("deqcore_jax.solve_per_shard does not return correction states; solve with "
                         "correction_states=0 or with deqcore.solve")
    options = {**options, "backend": "jax"}
    shards = math.prod(mesh.shape[a] for a in names)
    sizes = {int(jnp.shape(a)[0]) if jnp.ndim(a) else None for a in jax.tree.leaves((x, z0))}
    if not sizes:
        raise ValueError("deqcore_jax.solve_per_shard: x and z0 hold no array, so there is no batch "
                         "to split; pass z0 (or x) with the batch on axis 0")
    if None in sizes or len(sizes) > 1 or sizes.pop() % shards:
        shapes = [tuple(jnp.shape(a)) for a in jax.tree.leaves((x, z0))]
        raise ValueError(f"deqcore_jax.solve_per_shard: every array of x and z0 needs the same batch "
                         f"size on axis 0, a multiple of the {shards} shards of mesh axis {axis!r}; "
                         f"got shapes {shapes}")

    spec = P(names[0] if len(names) == 1 else names)
    meta: dict[str, Any] = {}

    # Every array f closes over (parameters traced by jit or grad, or concrete arrays placed on
    # the mesh) enters the shard_map as a replicated input: closed over, an array sharded on the
    # mesh is an error inside the manual region, and as inputs their gradients are summed over
    # the shards.
    def shard(a: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((a.shape[0] // shards, *a.shape[1:]), a.dtype)

    like = jax.tree.map(shard, (x if z0 is None else z0, x))
    layer, out_like = jax.make_jaxpr(f, return_shape=True)(*like)
    out_tree = jax.tree.structure(out_like)

    def local(x: Any, z0: Any, consts: list[Any]) -> tuple[Any, ...]:
        def f_local(z: Any, x: Any) -> Any:
            out = jax.core.eval_jaxpr(layer.jaxpr, consts, *jax.tree.leaves((z, x)))
            return jax.tree.unflatten(out_tree, out)

        sol = deqcore.solve(f_local, x, z0, **options)
        meta.update({name: getattr(sol, name) for name in SOLUTION_META_FIELDS})
        per_sample = {name: getattr(sol, name) for name in _PER_SAMPLE}
        traces = {name: getattr(sol, name) for name in _TRACES}
        counters = jnp.stack([jnp.asarray(sol.nfe), jnp.asarray(sol.steps)])[None]
        solver_state = jax.tree.map(lambda a: a[None] if jnp.ndim(a) == 0 else a, sol.solver_state)
        return sol.z, per_sample, traces, counters, solver_state

    # check_vma=False: the solver loops start from constants (zeros) and carry per-shard values,
    # which the replication checker would reject as a carry that changes type
    run = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P()),
                        out_specs=(spec, spec, P(None, spec[0]), spec, spec), check_vma=False)
    z, per_sample, traces, counters, solver_state = run(x, z0, list(layer.consts))
    return ShardedSolution(
        z=z, **per_sample, **traces, steps=jnp.max(counters[:, 1]), nfe=jnp.max(counters[:, 0]),
        solver_state=solver_state, shard_nfe=counters[:, 0], shard_steps=counters[:, 1], **meta)
