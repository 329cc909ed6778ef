"""The backend protocol: the few operations deqcore's algorithms need from an array framework.

Every solver and gradient mode in deqcore is written once against this protocol. A backend
(``deqcore_torch``, ``deqcore_jax``, or a third-party one) implements it and registers itself
through the ``deqcore_register_backends`` hook.

Arithmetic goes through ``backend.xp``, an Array-API namespace (array-api-compat's wrapper for
torch, ``jax.numpy`` for JAX). Everything that differs between eager and traced frameworks is a
method here: loops, in-place-or-functional updates, differentiation, and the custom-gradient hook.

Ownership rule: arrays in a loop state belong to the loop. ``set_index`` may update its buffer in
place (torch) or return a new one (JAX), so an algorithm never reads a buffer after passing it to
``set_index``; it uses the return value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

from ._capabilities import Capabilities

State = TypeVar("State")
Array = Any


@runtime_checkable
class Backend(Protocol):
    """What a framework must provide for deqcore's solvers and gradient modes.

    Attributes:
        name: the registry name (``"torch"``, ``"jax"``).
        xp: an Array-API namespace for this framework's arrays.
        static_shapes: True when every array shape in a loop must be fixed at trace time (JAX);
            solvers with growing memories then run the loop in stages of growing capacity.
        capabilities: what the backend supports beyond the eager operations (autodiff, jit,
            vmap, devices); a backend without ``autodiff`` refuses gradient modes with a
            :class:`deqcore.CapabilityError` instead of returning an undifferentiable ``z``.
    """

    name: str
    xp: Any
    static_shapes: bool
    capabilities: Capabilities

    def is_array(self, obj: object) -> bool:
        """True if ``obj`` is an array of this framework (including tracers)."""
        ...

    def no_grad(self) -> Any:
        """A context manager under which no autograd graph is recorded (torch) or a null context."""
        ...

    def while_loop(
        self, cond: Callable[[State], Array], body: Callable[[State], State], state: State,
        max_steps: int | None = None, check_every: int = 1,
    ) -> State:
        """Run ``state = body(state)`` while ``cond(state)`` holds; not differentiable.

        ``cond`` returns a boolean scalar array. At most ``max_steps`` bodies run (None: no
        limit), and ``cond`` is tested before body ``j`` only when ``j % check_every == 0``: the
        loop then runs whole groups of ``check_every`` bodies. JAX: ``lax.while_loop`` (jit- and
        vmap-safe). torch: a Python loop without autograd; ``bool(cond(state))`` is its only host
        round-trip, once per ``check_every`` bodies.
        """
        ...

    def differentiable_loop(
        self, cond: Callable[[State], Any], body: Callable[[State], State], state: State, max_steps: int,
        check_every: int = 1,
    ) -> State:
        """Like :meth:`while_loop` (at most ``max_steps`` bodies, the same tests) but
        reverse-differentiable.

        Used by the ``unroll`` gradient mode. torch: a Python loop with autograd recording;
        JAX: ``lax.fori_loop`` over ``max_steps`` whose body is skipped by ``lax.cond`` once
        ``cond`` fails (so the compiled loop always has ``max_steps`` iterations).
        """
        ...

    def fori_loop(self, length: int, body: Callable[[int, State], State], state: State) -> State:
        """Run ``state = body(i, state)`` for ``i`` in ``range(length)``, differentiably.

        ``length`` is static. Used by unrolled gradient modes and hypersolver training.
        """
        ...

    def jit(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` compiled for repeated calls with same-shaped arrays (JAX: ``jax.jit``), or ``fn``
        itself where there is nothing to compile (torch). ``fn`` takes and returns arrays and
        dicts/tuples of arrays. Used by hypersolver training's step.
        """
        ...

    def set_index(self, buffer: Array, index: Any, value: Array, axis: int = 0) -> Array:
        """Write ``value`` at position ``index`` of ``buffer`` along ``axis``; return the buffer.

        ``index`` may be a Python int or an integer scalar array (traced under JAX). torch
        writes in place; JAX returns an updated copy (in place once compiled).
        """
        ...

    def active_prefix(self, buffer: Array, count: Any, axis: int) -> Array:
        """The first ``count`` entries of ``buffer`` along ``axis`` where shapes may be dynamic
        (torch: a view), else the whole buffer (JAX: fixed shapes).

        Algorithms call it on ring memories and must give the unused trailing entries no weight
        (zero rows, masked weights), so both answers give the same result; the prefix only saves
        work while the ring is filling.
        """
        ...

    def linear_solve(self, a: Array, b: Array, symmetric_positive_definite: bool = False) -> Array:
        """Solve the batched systems ``a @ x = b`` (``a``: (..., k, k), ``b``: (..., k)).

        Never raises and never synchronises with the host: a singular system yields
        non-finite entries, which the calling algorithm detects and handles. With
        ``symmetric_positive_definite=True`` a backend may skip pivoting (JAX unrolls a
        Gauss-Jordan elimination for small ``k``, six times faster than a pivoted LU).
        """
        ...

    def vjp(
        self, fn: Callable[..., Array], *primals: Array, create_graph: bool = False
    ) -> tuple[Array, Callable[..., Any]]:
        """Return ``(fn(*primals), pullback)`` where ``pullback(ct)`` gives one cotangent per primal.

        Used by hypersolver training (the gradient of its loss with respect to the hypersolver's
        weights, through unrolled solver steps) and :func:`deqcore.jacobian_penalty`; the
        gradient modes' backward solves get ``v @ df/dz`` from :meth:`attach_adjoint`, built on
        the same reverse mode.
        Only called on backends whose ``capabilities.autodiff`` is True; a backend without
        autodiff may raise ``NotImplementedError``. The pullback may be called many times
        (backward solvers do). With
        ``create_graph=True`` the cotangents are themselves differentiable with respect to the
        arrays ``fn`` closes over (a penalty on them can be trained, as Jacobian
        regularisation does); JAX's are always, PyTorch needs ``create_graph`` in
        ``torch.autograd.grad``.
        """
        ...

    def stop_gradient(self, x: Array) -> Array:
        """``x`` with no gradient flowing back through it."""
        ...

    def attach_adjoint(
        self,
        f: Callable[[Array, Any], Array],
        z_star: Array,
        x: Any,
        adjoint: Callable[..., Array],
        saved: tuple[Array, ...] = (),
        higher_order_error: Callable[[], Exception] | None = None,
        linear_solve: Callable[[Array, Callable[[Array], Array]], Array] | None = None,
    ) -> Array:
        """The custom-gradient hook every gradient mode is built on.

        Returns an array equal to ``z_star`` whose gradient is defined as follows: the incoming
        cotangent ``g`` (w.r.t. the returned array) is turned into an adjoint
        ``u = adjoint(g, vjp_z, *saved)``, where ``vjp_z(v) = v @ df/dz`` at ``(z_star, x)``, and
        ``u`` is carried to ``x`` and to everything ``f`` closes over (parameters) by one VJP of
        ``f`` at ``z_star``. No gradient flows into ``z_star`` itself.

        ``saved`` are arrays the adjoint needs (GDEQ: Broyden's ``U``, ``V``). They are kept for
        the backward pass the framework's own way (torch: ``ctx.save_for_backward``, so
        ``saved_tensors_hooks`` see them; JAX: ``custom_vjp`` residuals), and ``adjoint`` must not
        close over any other array: under ``jax.jit`` that would leak a tracer.

        Without ``linear_solve``, first derivatives only: ``adjoint`` runs without recording a
        graph, and the backward holds ``z_star`` constant, so the gradient it gives cannot be
        differentiated correctly again. A derivative of that gradient (with respect to anything:
        the parameters, ``x``, or what the cotangent ``g`` depends on, also for losses linear in
        ``z*``) raises ``higher_order_error()`` (None: a :class:`deqcore.HigherOrderError` naming
        no mode); the first derivative itself is unaffected, also when taken with
        ``create_graph=True``.

        With ``linear_solve`` (given by modes whose adjoint is the exact ``g (I - J)^-1``, such as
        ``implicit``): exact to every order. ``linear_solve(b, op)`` returns ``w = b + op(w)`` per
        sample for a linear ``op`` on (B, n) arrays; the backend calls it with ``op`` a JVP
        ``v -> J v`` or a VJP ``v -> v J`` of ``f`` at ``z*`` (with ``z*`` carrying its own
        implicit derivative) for every linear system a derivative of the gradient needs: the
        tangent of ``z*``, ``(I - J) dz = f_x dx + f_theta dtheta``; that of the adjoint,
        ``du (I - J) = dg + u dJ``; their transposes in reverse mode. Those solves are
        differentiated implicitly (never through their iterations), so a third derivative is
        exact too. The first derivative is unchanged: ``u = adjoint(g, ...)``, the same VJPs;
        ``linear_solve`` runs only when a higher derivative is taken. A backend that cannot do
        this ignores ``linear_solve`` and keeps the ``higher_order_error()`` check (the error
        then names the backend); it must never give a derivative that holds ``z*`` or ``u``
        constant.

        torch: an identity ``autograd.Function`` on ``f(z*)`` (parameters of modules used by ``f``
        receive ``.grad`` through ``loss.backward()``); nothing is attached when grad mode is off or
        nothing ``f`` uses requires grad. Under ``create_graph=True`` ``u`` passes through a
        function whose own backward raises, tied to ``g`` and ``f(z*)``. JAX: ``custom_vjp``
        with closure conversion, so arrays ``f`` closes over receive gradients under
        ``jax.grad``, ``jax.jit`` and ``jax.vmap``; the backward starts with a ``custom_jvp``
        identity on ``g`` and the residuals whose JVP rule raises when any of them carries a
        tangent (an outer derivative). Forward-mode differentiation of the returned array is not
        supported (JAX's ``custom_vjp`` error). With ``linear_solve``: torch, a backward recorded
        under ``create_graph`` rebuilds ``z*`` (this hook again) and ``u`` (this hook on
        ``u = g + u J``, whose adjoint solves ``w = b + J w``, the JVP by a VJP of the VJP) with
        their implicit gradients on the graph, and returns ``u f(z*)`` differentiated with
        respect to the leaves and ``x`` ``f`` reaches (a tensor ``f`` closes over that is neither
        gives the error instead); JAX, the residual ``z*`` and ``u`` are ``custom_jvp``
        functions whose rules solve through ``lax.custom_linear_solve``.
        """
        ...

    def attach_reverse(
        self,
        f: Callable[[Array, Any], Array],
        z_star: Array,
        x: Any,
        backward: Callable[..., Any],
        saved: tuple[Array, ...] = (),
        higher_order_error: Callable[[], Exception] | None = None,
    ) -> Array:
        """The custom-gradient hook of modes whose gradient is a sum of VJPs of ``f`` at many
        points (``grad="reversible"``, which reverses the forward iteration step by step).

        Returns an array equal to ``z_star`` whose backward pass calls
        ``backward(g, pullback, acc, *saved)`` once, with the incoming cotangent ``g``, and
        delivers the accumulator it returns to ``x`` and to everything ``f`` closes over.
        ``pullback(p, v, acc)`` evaluates ``f`` at a (B, n) point ``p`` and returns
        ``(f(p, x), v @ df/dz at p, acc + v @ df/d(x, parameters) at p)``; ``acc`` is opaque to
        the caller (the backend creates the zero it starts from and reads the final one), so
        ``backward`` only carries it, for example through ``backend.while_loop`` (on JAX it is a
        pytree of arrays in the loop's carry). No gradient flows into ``z_star``. ``saved`` are kept
        the framework's own way (as in :meth:`attach_adjoint`) and ``backward`` must not close
        over any other array of the forward pass.

        First derivatives only: ``backward`` runs without recording a graph, and a derivative of
        the gradient raises ``higher_order_error()`` (None: a :class:`deqcore.HigherOrderError`).

        torch: the tensors ``f`` uses that require grad are found by evaluating ``f`` once at
        ``(z*, x)`` and walking its graph to the leaves (``AccumulateGrad`` nodes); they and the
        tensors of ``x`` that require grad are the inputs of an ``autograd.Function`` whose backward
        returns their accumulated gradients, so a non-leaf ``x`` passes its gradient on to what
        computed it and ``loss.backward()`` and ``torch.autograd.grad`` both work; nothing is
        attached when grad mode is off or nothing requires grad. JAX: ``custom_vjp`` with closure
        conversion (``acc`` holds the cotangents of ``x`` and of the closed-over arrays), under
        ``jax.grad``, ``jax.jit`` and ``jax.vmap``.
        """
        ...

    def first_order_only(self, x: Array, make_error: Callable[[], Exception]) -> Array:
        """``x`` unchanged, with a check on its gradient path: the cotangent that flows back through
        ``x`` passes unchanged, and differentiating it (a second derivative through ``x``, with
        respect to anything upstream of ``x`` or of the cotangent) raises ``make_error()``.

        ``deqcore.solve`` applies it to the result of every gradient mode that neither declares
        :attr:`deqcore.extend.GradientMode.exact_higher_order` nor is a
        :class:`deqcore.extend.AdjointMode` (whose
        :meth:`attach_adjoint` checks its own backward). torch: an identity ``autograd.Function``
        (nothing is attached when grad mode is off or ``x`` does not require grad) whose backward,
        when it is recorded (``create_graph=True``), returns the cotangent through a function whose
        own backward raises, tied to ``x``'s graph by a one-element anchor. JAX: a ``custom_vjp``
        identity whose backward passes the cotangent through a ``custom_jvp`` identity that
        raises when the cotangent or ``x`` carries a tangent; reverse mode only (a first-order
        ``jax.jvp`` through ``x`` gets JAX's ``custom_vjp`` error).
        """
        ...

    def host_callback(self, fn: Callable[..., None], *arrays: Array) -> None:
        """Call ``fn`` with NumPy copies of ``arrays`` on the host, also from traced code.

        Used for reports that must not stop a computation (a backward solve's statistics):
        concrete arrays are passed at once; under tracing ``fn`` runs when the compiled
        computation executes (JAX: ``jax.debug.callback``).
        """
        ...

    def to_numpy(self, x: Array) -> Any:
        """A NumPy copy of a concrete array (used for reports, never inside a solver loop)."""
        ...

    def is_concrete(self, x: Array) -> bool:
        """False while ``x`` is an abstract tracer (inside ``jax.jit``/``vmap``); True otherwise."""
        ...

    def device(self, x: Array) -> Any:
        """The device ``x`` lives on, or None when it cannot be known (tracers)."""
        ...

    def host_check(self, failed: Array, make_error: Callable[..., Exception], *payload: Array) -> None:
        """Raise ``make_error(failed, *payload)`` (NumPy copies) if any entry of ``failed`` is True.

        Concrete arrays are checked at once; under tracing the check runs when the compiled
        computation executes (the error then arrives wrapped in the framework's runtime error).
        """
        ...

    def register_pytree(self, cls: type, data_fields: list[str], meta_fields: list[str]) -> None:
        """Make ``cls`` (a dataclass) traversable by the framework (no-op where meaningless)."""
        ...

    def compiled(self, mode: str | None = None) -> Backend:
        """This backend with compiled solver loops (``deqcore.solve(..., compile=...)``).

        ``mode`` is the framework's compilation mode (torch: a ``torch.compile`` mode; None for
        its default); an unknown mode is a ``ValueError`` naming the valid ones. A backend whose
        loops are always compiled returns itself (JAX). torch: the fixed-shape mode of the
        algorithms (``static_shapes`` True) with each loop body compiled and cached; gradient
        modes still run on the eager backend.
        """
        ...
