"""HyperAnderson: HyperDEQ's learned solver, an initialiser plus Anderson-style iterations whose
mixing weights and step size a tiny network predicts."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from .._arrays_io import load_arrays, save_arrays
from .._options import Option, one_of, positive_int, resolve
from .._structure import Structure
from ..solvers._base import Hypersolver, Problem, Solver, select_rows
from ._mixers import NORMALISATIONS, AndersonMixer, TemporalConvMixer, project_weights

FORMAT = "deqcore-hypersolver"
UPDATES = ("weighted", "sum")

#: HyperAnderson's settings besides its pieces and weights: validated when it is built, saved
#: with the weights (:meth:`HyperAnderson.config`) and required when they are loaded.
SETTINGS: dict[str, Option[Any]] = {
    "iterations": Option(10, "K, the step budget training targets", positive_int),
    "memory": Option(5, "m; the window holds m + 1 iterates", positive_int),
    "normalisation": Option("shift", "projection of the predicted weights onto sum 1",
                            one_of(*NORMALISATIONS)),
    "update": Option("weighted", "step term: beta G^T alpha ('weighted') or beta sum_i g_i ('sum')",
                     one_of(*UPDATES)),
}


class HyperAndersonState(NamedTuple):
    """The window of the last ``W = memory + 1`` iterates, kept as a ring of slots.

    ``Z``, ``G`` (B, W, n): iterates and residuals; ``C`` (B, W, c): compressed residuals;
    ``count``: iterates stored so far. ``alpha`` (B, W, oldest first) and ``beta`` (B,) are the
    last step's mixing weights and step size, ``mix_g`` (B, n) its mixed residual ``G^T alpha``
    (the Anderson objective that training's ``L_alpha`` penalises).
    """

    z: Any
    fz: Any
    Z: Any
    G: Any
    C: Any
    count: Any
    alpha: Any
    beta: Any
    mix_g: Any


class HyperAndersonIteration(Solver):
    """One solve's HyperAnderson iteration: ``z = sum_i a_i z_i + beta * sum_i a_i g_i``.

    The weights come from the mixer on the compressed window, oldest first, then
    :func:`project_weights`; with ``update="sum"`` the step term is ``beta * sum_i g_i``. One
    f-evaluation a step. Built by :meth:`HyperAnderson.bind`.
    """

    def __init__(self, *, max_iter: int, mixer: Any, params: Mapping[str, Any], compress: Any,
                 window: int, normalisation: str, update: str) -> None:
        self.max_iter, self.mixer, self.params, self.compress = max_iter, mixer, params, compress
        self.window, self.normalisation, self.update = window, normalisation, update

    def init(self, problem: Problem, z0: Any, fz0: Any) -> HyperAndersonState:
        xp = problem.backend.xp
        B, n = z0.shape
        g0 = fz0 - z0
        c0 = self.compress(g0)
        device = array_api_compat.device(z0)
        self._positions = xp.arange(self.window, device=device)  # one per solve, not per step
        ring = xp.zeros((B, self.window, n), dtype=z0.dtype, device=device)
        comp = xp.zeros((B, self.window, c0.shape[1]), dtype=z0.dtype, device=device)
        alpha = xp.zeros((B, self.window), dtype=z0.dtype, device=device)
        state = HyperAndersonState(z0, fz0, ring, xp.zeros_like(ring), comp, 0, alpha,
                                   xp.zeros_like(z0[:, 0]), xp.zeros_like(z0))
        return self._store(problem.backend, state, z0, fz0, g0, c0)

    def _store(self, backend: Any, state: HyperAndersonState, z: Any, fz: Any, g: Any,
               c: Any) -> HyperAndersonState:
        slot = state.count % self.window
        return state._replace(
            z=z, fz=fz,
            Z=backend.set_index(state.Z, slot, z, axis=1),
            G=backend.set_index(state.G, slot, g, axis=1),
            C=backend.set_index(state.C, slot, c, axis=1),
            count=state.count + 1,
        )

    def step(self, problem: Problem, state: HyperAndersonState, active: Any):
        backend = problem.backend
        xp = backend.xp
        W = self.window
        pos = self._positions
        index = state.count - W + pos  # the store index at each window position, oldest first
        valid = index >= 0
        # order[p, s] = 1 where ring slot s holds window position p
        order = xp.astype((index % W)[:, None] == pos[None, :], state.z.dtype)
        feats = xp.matmul(order, state.C)
        alpha_hat, beta = self.mixer(backend, self.params, feats, valid)
        alpha = project_weights(xp, alpha_hat, valid, self.normalisation)
        ring_alpha = xp.matmul(alpha, order)[:, None, :]
        mix_z = xp.matmul(ring_alpha, state.Z)[:, 0]
        mix_g = xp.matmul(ring_alpha, state.G)[:, 0]
        if self.update == "weighted":
            step_g = mix_g
        else:
            in_window = xp.matmul(xp.astype(valid, state.z.dtype), order)
            step_g = xp.sum(state.G * in_window[None, :, None], axis=1)
        proposal = mix_z + beta[:, None] * step_g
        z = select_rows(xp, active, proposal, state.z)
        fz = problem.fn(z)
        return z, fz, state._replace(alpha=alpha, beta=beta, mix_g=mix_g), 1

    def commit(self, problem, state: HyperAndersonState, z_new, fz_new, g_new, active, keep):
        return self._store(problem.backend, state, z_new, fz_new, g_new, self.compress(g_new))


class HyperAnderson(Hypersolver):
    """HyperDEQ's neural solver (Bai et al. 2022): a learned initialiser ``h_phi(x)`` and
    HyperAnderson iterations whose weights ``alpha`` and step ``beta`` a tiny network predicts.

    Iteration k (window of the last ``m_k + 1 <= memory + 1`` iterates, oldest first):
    ``alpha_hat, beta = mixer(compress(g_{k-m_k}), ..., compress(g_k))``, ``alpha`` = the
    projection of ``alpha_hat`` onto ``sum(alpha) = 1`` (see :func:`project_weights`), and
    ``z_{k+1} = sum_i alpha_i z_i + beta * sum_i alpha_i g_i`` with ``g = f(z) - z``. At ``k = 0``
    the step is ``z_0 + beta g_0``. Each iteration costs one evaluation of ``f``.

    Args:
        compression: maps a residual (the state's structure) to ``(B, compression.features)``;
            models supply theirs (``deqcore_models``), :class:`IdentityCompression` suits small
            flat states.
        initialiser: ``h_phi``, or None to start from zeros (the initialiser ablation).
        mixer: the weight predictor; default :class:`TemporalConvMixer` (HyperDEQ's ``s_xi``:
            two kernel-3 convolutions of ``width`` channels, GELU). :class:`AndersonMixer`
            reproduces classic Anderson (memory ``memory + 1``).
        iterations: K, the budget training targets (its loss unrolls 2K by default; inference may
            run any number).
        memory: m; the window holds ``m + 1`` iterates.
        normalisation: ``"shift"`` (default), ``"softmax"`` or ``"none"`` (ablations).
        update: ``"weighted"`` (default, ``beta * G^T alpha``) or ``"sum"`` (``beta * sum_i g_i``,
            the review text's literal form).
        width: the default mixer's width.
        beta_max: the default mixer's largest step: ``beta = beta_max * sigmoid(.)``.
        beta_init: the default mixer's initial ``beta``.
        prior: the weights the default mixer's output corrects (``"anderson"``, default, or
            ``"newest"``; see :class:`TemporalConvMixer`).
        params: trained weights (``mixer.*``, ``init.*``); default a fresh initialisation from
            ``seed``. Names and shapes are checked.
    """

    name = "hyperanderson"

    def __init__(self, compression: Any, initialiser: Any = None, mixer: Any = None, *,
                 iterations: int = SETTINGS["iterations"].default,
                 memory: int = SETTINGS["memory"].default,
                 normalisation: str = SETTINGS["normalisation"].default,
                 update: str = SETTINGS["update"].default, width: int = 64, beta_max: float = 1.0,
                 beta_init: float = 0.9, prior: str = "anderson",
                 params: Mapping[str, np.ndarray] | None = None, seed: int = 0) -> None:
        settings = resolve("HyperAnderson", SETTINGS, {"iterations": iterations, "memory": memory,
                                                      "normalisation": normalisation, "update": update})
        if not isinstance(getattr(compression, "features", None), int) or compression.features < 1:
            raise TypeError("HyperAnderson: compression must have an int attribute 'features' >= 1")
        self.compression, self.initialiser = compression, initialiser
        self.mixer = mixer if mixer is not None else TemporalConvMixer(compression.features, width,
                                                                       beta_max, beta_init, prior)
        self.iterations, self.memory = settings["iterations"], settings["memory"]
        self.normalisation, self.update = settings["normalisation"], settings["update"]
        fresh = self._fresh_params(seed)
        self.params = fresh if params is None else _checked(dict(params), fresh)
        self._cache: dict[tuple[str, str, str], dict[str, Any]] = {}

    def _fresh_params(self, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        params = {f"mixer.{k}": np.asarray(v, np.float64) for k, v in self.mixer.init_params(rng).items()}
        if self.initialiser is not None:
            params.update({f"init.{k}": np.asarray(v, np.float64)
                           for k, v in self.initialiser.init_params(rng).items()})
        return params

    def config(self) -> dict[str, Any]:
        """Everything but the weights, as JSON-able data (saved with them)."""
        return {"algorithm": self.name, **{key: getattr(self, key) for key in SETTINGS},
                "mixer": self.mixer.config(), "compression": self.compression.config(),
                "initialiser": None if self.initialiser is None else self.initialiser.config()}

    def parameter_count(self) -> int:
        return int(sum(v.size for v in self.params.values()))

    def with_params(self, params: Mapping[str, np.ndarray]) -> HyperAnderson:
        """A copy holding ``params`` (NumPy; names and shapes checked)."""
        out = copy.copy(self)
        out.params = _checked({k: np.asarray(v) for k, v in params.items()}, self.params)
        out._cache = {}
        return out

    def arrays(self, backend: Any, like: Any) -> dict[str, Any]:
        """The weights as ``backend`` arrays of ``like``'s dtype and device (cached outside tracing)."""
        device = backend.device(like)
        key = (backend.name, str(like.dtype), str(device))
        if key in self._cache:
            return self._cache[key]
        xp = backend.xp
        arrays = {k: xp.asarray(v, dtype=like.dtype, device=device) for k, v in self.params.items()}
        if all(backend.is_concrete(a) for a in arrays.values()):  # never keep a tracer (jax.jit)
            self._cache[key] = arrays
        return arrays

    def bind(self, backend: Any, structure: Structure, like: Any, *, max_iter: int,
             params: Mapping[str, Any] | None = None) -> HyperAndersonIteration:
        p = self.arrays(backend, like) if params is None else params
        mixer_params = {k[len("mixer."):]: v for k, v in p.items() if k.startswith("mixer.")}
        compression = self.compression

        def compress(g_flat: Any) -> Any:
            return compression(backend, structure.unflatten(backend, g_flat))

        return HyperAndersonIteration(max_iter=max_iter, mixer=self.mixer, params=mixer_params,
                                   compress=compress, window=self.memory + 1,
                                   normalisation=self.normalisation, update=self.update)

    def initial_state(self, backend: Any, x: Any, like: Any, params: Mapping[str, Any] | None = None) -> Any:
        if self.initialiser is None:
            return None
        p = self.arrays(backend, like) if params is None else params
        init_params = {k[len("init."):]: v for k, v in p.items() if k.startswith("init.")}
        return self.initialiser(backend, init_params, x)

    def save(self, path: str | os.PathLike[str], meta: Mapping[str, Any] | None = None) -> Path:
        """Write the weights and :meth:`config` to a framework-neutral ``.npz`` (atomically);
        ``meta`` adds JSON-able notes (training statistics, the model it was trained for)."""
        return save_arrays(path, self.params, {"format": FORMAT, "config": self.config(),
                                               "meta": dict(meta or {})})

    def __repr__(self) -> str:
        init = "none" if self.initialiser is None else self.initialiser.config().get("kind", "?")
        return (f"HyperAnderson(K={self.iterations}, m={self.memory}, normalisation={self.normalisation!r}, "
                f"mixer={self.mixer.config().get('kind')}, initialiser={init}, "
                f"features={self.compression.features}, params={self.parameter_count()})")


def load_hypersolver(path: str | os.PathLike[str], compression: Any,
                     initialiser: Any = None) -> HyperAnderson:
    """Load weights saved by :meth:`HyperAnderson.save`.

    ``compression`` and ``initialiser`` are the model-specific pieces (code, not data); their
    :meth:`config` must equal the saved one, so weights trained for one model are not silently
    used with another. The weights must then have exactly the names and shapes the settings
    give, floating dtypes and finite values. Returns the hypersolver with the saved settings and
    weights; anything else (an unreadable file, missing or malformed settings, a mismatch) is a
    ``ValueError`` naming ``path``.
    """
    arrays, meta = load_arrays(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a deqcore hypersolver file (format {meta.get('format')!r})")
    cfg = meta.get("config")
    keys = ("algorithm", *SETTINGS, "mixer")
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: its metadata has no settings ('config'); not a complete hypersolver file")
    missing = [k for k in keys if k not in cfg]
    if missing or not isinstance(cfg["mixer"], dict) or "kind" not in cfg["mixer"]:
        raise ValueError(f"{path}: its settings lack {', '.join(missing) or 'mixer.kind'}; not a complete "
                         f"hypersolver file")
    for label, piece in (("compression", compression), ("initialiser", initialiser)):
        saved = cfg.get(label)
        given = None if piece is None else piece.config()
        if saved != given:
            raise ValueError(f"{path}: the hypersolver was trained with {label} {saved}, "
                             f"but {given} was given")
    not_float = sorted(k for k, v in arrays.items() if not np.issubdtype(v.dtype, np.floating))
    if not_float:
        raise ValueError(f"{path}: weights {', '.join(not_float)} are not floating-point arrays")
    from .._registry import registry

    cls = registry().get("hypersolvers", cfg["algorithm"]).obj
    mixer_cfg = dict(cfg["mixer"])
    kind = mixer_cfg.pop("kind")
    try:
        mixer = TemporalConvMixer(**mixer_cfg) if kind == "temporal_conv" else AndersonMixer(**mixer_cfg)
        return cls(compression, initialiser, mixer, params=arrays, **{key: cfg[key] for key in SETTINGS})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def _checked(params: dict[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = sorted(set(reference) - set(params))
    unknown = sorted(set(params) - set(reference))
    if missing or unknown:
        raise ValueError(f"hypersolver weights do not match its settings: missing {missing}, "
                         f"unexpected {unknown}")
    for k, v in params.items():
        if tuple(v.shape) != tuple(reference[k].shape):
            raise ValueError(f"hypersolver weight {k!r} has shape {tuple(v.shape)}, expected "
                             f"{tuple(reference[k].shape)}")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"hypersolver weight {k!r} contains NaN or Inf")
    return {k: np.asarray(v, np.float64) for k, v in params.items()}
