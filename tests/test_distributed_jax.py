"""Solves over JAX device meshes give the one-device answers, and per-shard loops stop per shard.

Two host devices (``--xla_force_host_platform_device_count=2``) must be configured before jax is
imported, so the checks run in a fresh interpreter: this file run as a script, ``python
test_distributed_jax.py CHECK``, prints the arrays it measured as JSON and the tests compare them.
Float64 throughout. Compared with one device on the whole batch:

* the global loop: ``deqcore.solve`` under ``jax.jit`` with x and z0 sharded
  ``NamedSharding(mesh, P("batch"))`` and the parameters replicated;
* the per-shard loops of ``deqcore_jax.solve_per_shard``;

for z*, the Solution's fields and the gradients to the parameters and to x, in every gradient
mode, on array and tuple states, with anderson, broyden and fixed_point. Each per-shard loop is
also compared with one device solving that shard alone, which it equals exactly. Two processes
joined by ``jax.distributed.initialize`` (one CPU device each, gloo collectives) solve a batch
split across them and get the one-process answer.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.backend("jax")

TOL = 1e-10
N, D, BATCH = 6, 3, 8
#: (solver, state, gradient modes, solve options): every gradient mode of the JAX backend, every
#: solver, array and tuple states. ``unroll`` differentiates through the loop: with the cheapest
#: solver, as its cost is what the loop's is. GDEQ's backward applies Broyden's low-rank estimate,
#: whose last pairs come from steps of the size of the tolerance: solved to 1e-12, the rounding
#: that differs between batch sizes (one device holds 8 samples, a shard 4) is amplified to 1e-7
#: in them, so it is compared at a tolerance where the estimate is well conditioned (a shard
#: still equals one device solving that shard alone exactly).
CASES = [
    ("anderson", "array", ("implicit", "jfb"), {"tol": 1e-12}),
    ("broyden", "array", ("gdeq", "npg"), {"tol": 1e-6, "memory": 16}),
    ("fixed_point", "array", ("unroll", "upg"), {"tol": 1e-12}),
    ("anderson", "tuple", ("implicit",), {"tol": 1e-12}),
    ("broyden", "tuple", ("npg",), {"tol": 1e-12, "memory": 16}),
]
FIELDS = ("z", "abs_residual", "rel_residual", "iterations", "status", "converged", "nfe", "steps")


def _params(state: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    if state == "array":
        return {"W": 0.3 * rng.normal(size=(N, N)), "U": rng.normal(size=(N, D))}
    return {"A": 0.3 * rng.normal(size=(4, 4)), "U": rng.normal(size=(4, D)),
            "C": 0.3 * rng.normal(size=(2, 2)), "E": 0.3 * rng.normal(size=(2, 4))}


def _x() -> np.ndarray:
    return np.random.default_rng(8).normal(size=(BATCH, D))


def _layer(p, state: str):
    """f(z, x): a tanh layer on an array state, or two coupled ones on a (B, 4), (B, 2) tuple."""
    import jax.numpy as jnp

    if state == "array":
        return lambda z, x: jnp.tanh(z @ p["W"].T + x @ p["U"].T)
    return lambda z, x: (jnp.tanh(z[0] @ p["A"].T + x @ p["U"].T),
                         jnp.tanh(z[1] @ p["C"].T + z[0] @ p["E"].T))


def _z0(x, state: str):
    import jax.numpy as jnp

    if state == "array":
        return jnp.zeros((x.shape[0], N), x.dtype)
    return jnp.zeros((x.shape[0], 4), x.dtype), jnp.zeros((x.shape[0], 2), x.dtype)


def _outputs(solve, state: str, modes, solver: str, options):
    """A jittable ``(params, x) -> {mode: (loss, Solution fields, grads)}`` with ``solve`` being
    ``deqcore.solve`` or a mesh solve."""
    import jax
    import jax.numpy as jnp

    def loss(p, x, mode):
        sol = solve(_layer(p, state), x, _z0(x, state), solver=solver, grad=mode, max_iter=60,
                    **options)
        return sum(jnp.sum(jnp.sin(z)) for z in jax.tree.leaves(sol.z)), sol

    def run(p, x):
        out = {}
        for mode in modes:
            (value, sol), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x, mode)
            fields = {name: getattr(sol, name) for name in FIELDS}
            fields["z"] = jnp.concatenate(jax.tree.leaves(sol.z), axis=1)
            out[mode] = {"loss": value, **fields, "grad_x": grads[1],
                         **{f"grad_{k}": v for k, v in grads[0].items()}}
            if hasattr(sol, "shard_nfe"):
                out[mode].update(shard_nfe=sol.shard_nfe, shard_steps=sol.shard_steps)
        return out

    return run


def _lists(tree):
    import jax

    return jax.tree.map(lambda a: np.asarray(a).tolist(), tree)


def _check_mesh_solves() -> dict:
    """Every case solved on one device, with the global loop over the mesh and per shard."""
    import deqcore_jax
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import deqcore

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    batch, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())

    def per_shard(*args, **kw):
        return deqcore_jax.solve_per_shard(*args, mesh=mesh, **kw)

    report = {}
    for solver, state, modes, options in CASES:
        p, x = _params(state), _x()
        one = jax.device_put((p, x), jax.devices()[0])
        on_mesh = (jax.device_put(p, replicated), jax.device_put(x, batch))
        runs = {"one": (deqcore.solve, one), "global": (deqcore.solve, on_mesh),
                "per_shard": (per_shard, on_mesh)}
        out = {name: jax.jit(_outputs(fn, state, modes, solver, options))(*args)
               for name, (fn, args) in runs.items()}
        on_half = jax.jit(_outputs(deqcore.solve, state, modes, solver, options))
        halves = [on_half(one[0], one[1][i * BATCH // 2:(i + 1) * BATCH // 2]) for i in range(2)]
        specs = {name: list(out[name][modes[0]]["z"].sharding.spec) for name in ("global", "per_shard")}
        report[f"{solver}-{state}"] = {"z_sharding": specs,
                                       **_lists(out), "halves": _lists(halves)}
    return report


def _uneven_problem():
    """Shard 0 contracts by 0.1 per step, shard 1 by 0.9: plain iteration needs far more steps on
    shard 1. The contraction factor is x's first column; W is closed over by f."""
    import jax.numpy as jnp

    rng = np.random.default_rng(9)
    W = rng.normal(size=(N, N))
    W /= np.linalg.norm(W, 2)
    x = rng.normal(size=(BATCH, D))
    x[:, 0] = np.repeat([0.1, 0.9], BATCH // 2)

    def make(W):
        return lambda z, x: x[:, :1] * jnp.tanh(z @ W.T) + jnp.tanh(x @ jnp.ones((D, N)))

    return W, x, make


def _check_uneven_shards() -> dict:
    """Global loop against per-shard loops when the shards differ in difficulty."""
    import deqcore_jax
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import deqcore

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    W, x, make = _uneven_problem()
    W = jax.device_put(W, NamedSharding(mesh, P()))
    x = jax.device_put(x, NamedSharding(mesh, P("batch")))
    kw = {"solver": "fixed_point", "tol": 1e-12, "max_iter": 400}

    def run(solve):
        def loss(W, x):
            sol = solve(make(W), x, jnp.zeros((x.shape[0], N)), **kw)
            return jnp.sum(sol.z ** 2), sol

        (value, sol), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(W, x)
        fields = {name: getattr(sol, name) for name in (*FIELDS, "shard_nfe", "shard_steps")
                  if hasattr(sol, name)}
        return _lists({"loss": value, "grad_W": grad, **fields})

    # outside jit, f closing over a concrete array placed on the mesh (not a traced parameter)
    eager = deqcore_jax.solve_per_shard(make(W), x, jnp.zeros((BATCH, N)), mesh=mesh, **kw)
    return {"global": run(deqcore.solve),
            "per_shard": run(lambda *a, **k: deqcore_jax.solve_per_shard(*a, mesh=mesh, **k)),
            "eager_per_shard": _lists({"z": eager.z, "shard_nfe": eager.shard_nfe}),
            "errors": _bad_input_errors(mesh, make(W), x)}


def _bad_input_errors(mesh, f, x) -> dict[str, str]:
    import deqcore_jax
    import jax.numpy as jnp

    calls = {
        "odd batch": lambda: deqcore_jax.solve_per_shard(f, x[:3], jnp.zeros((3, N)), mesh=mesh),
        "batch mismatch": lambda: deqcore_jax.solve_per_shard(f, x, jnp.zeros((6, N)), mesh=mesh),
        "axis": lambda: deqcore_jax.solve_per_shard(f, x, jnp.zeros((BATCH, N)), mesh=mesh, axis="data"),
        "mesh": lambda: deqcore_jax.solve_per_shard(f, x, jnp.zeros((BATCH, N)), mesh="batch"),
        "batched": lambda: deqcore_jax.solve_per_shard(f, x, jnp.zeros((BATCH, N)), mesh=mesh,
                                                       batched=False),
        "backend": lambda: deqcore_jax.solve_per_shard(f, x, jnp.zeros((BATCH, N)), mesh=mesh,
                                                       backend="torch"),
        "no arrays": lambda: deqcore_jax.solve_per_shard(f, None, None, mesh=mesh),
        "option": lambda: deqcore_jax.solve_per_shard(f, x, jnp.zeros((BATCH, N)), mesh=mesh,
                                                      memmory=3),
    }
    errors = {}
    for name, call in calls.items():
        try:
            call()
            errors[name] = "no error"
        except (TypeError, ValueError) as e:
            errors[name] = f"{type(e).__name__}: {e}"
    return errors


def _multi_process_solve(process_id: int, port: int) -> dict:
    """One of two processes: its half of the batch, the parameters replicated, both loops."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=60)
    import deqcore_jax
    from jax.experimental.multihost_utils import process_allgather as gather
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import deqcore

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    p = jax.device_put(_params("array"), NamedSharding(mesh, P()))
    half = _x()[process_id * BATCH // 2:(process_id + 1) * BATCH // 2]
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("batch")), half)
    out = {}
    for name, solve in (("global", deqcore.solve),
                        ("per_shard", lambda *a, **k: deqcore_jax.solve_per_shard(*a, mesh=mesh, **k))):
        run = jax.jit(_outputs(solve, "array", ("implicit",), "anderson", {"tol": 1e-12}))
        res = run(p, x)["implicit"]
        out[name] = _lists({k: v if v.is_fully_addressable else gather(v, tiled=True)
                            for k, v in res.items()})
    out["processes"] = jax.process_count()
    return out


def _run_script(*args: str, timeout: float = 300) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_ENABLE_X64": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env,
                         timeout=timeout)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _assert_close(actual, expected, what: str, tol: float = TOL) -> None:
    a, e = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    assert np.all(np.abs(a - e) <= tol), f"{what}: max difference {np.max(np.abs(a - e))}"


def _assert_same_solve(got: dict, ref: dict, what: str) -> None:
    """The same z*, Solution fields and gradients; counters exactly."""
    assert ref["converged"] and all(ref["converged"]), f"{what}: the reference did not converge"
    for key in ref:
        if key in ("iterations", "status", "converged", "nfe", "steps"):
            assert got[key] == ref[key], f"{what} {key}: {got[key]} != {ref[key]}"
        elif not key.startswith("shard_"):
            _assert_close(got[key], ref[key], f"{what} {key}")


@pytest.fixture(scope="module")
def mesh_solves() -> dict:
    return _run_script("mesh")


@pytest.mark.parametrize("case", [f"{solver}-{state}" for solver, state, _, _ in CASES])
def test_mesh_solves_equal_one_device(mesh_solves, case):
    out = mesh_solves[case]
    assert out["z_sharding"] == {"global": ["batch"], "per_shard": ["batch"]}  # ran sharded
    for mode, ref in out["one"].items():
        for loop in ("global", "per_shard"):
            _assert_same_solve(out[loop][mode], ref, f"{case} {mode} {loop}")


@pytest.mark.parametrize("case", [f"{solver}-{state}" for solver, state, _, _ in CASES])
def test_each_shard_loop_is_one_device_on_that_shard(mesh_solves, case):
    out = mesh_solves[case]
    for mode, got in out["per_shard"].items():
        halves = [h[mode] for h in out["halves"]]
        assert got["shard_nfe"] == [h["nfe"] for h in halves]
        assert got["shard_steps"] == [h["steps"] for h in halves]
        assert got["nfe"] == max(got["shard_nfe"]) and got["steps"] == max(got["shard_steps"])
        for key in ("z", "abs_residual", "rel_residual", "iterations", "status"):
            # exactly: a shard runs the very computation one device runs on those samples
            assert got[key] == halves[0][key] + halves[1][key], f"{case} {mode} {key}"
        # parameter gradients: the sum of the shards' (summed over devices by the transpose)
        _assert_close(got["grad_x"], halves[0]["grad_x"] + halves[1]["grad_x"], f"{case} {mode} grad_x")
        for key in got:
            if key.startswith("grad_") and key != "grad_x":
                _assert_close(got[key], np.add(halves[0][key], halves[1][key]), f"{case} {mode} {key}")


@pytest.fixture(scope="module")
def uneven() -> dict:
    return _run_script("uneven")


def test_per_shard_loops_stop_per_shard(uneven):
    glob, local = uneven["global"], uneven["per_shard"]
    fast, slow = local["shard_nfe"]
    assert fast < slow / 3, local["shard_nfe"]  # shard 0 contracts 9x faster per step
    # the global loop runs every sample until the slowest anywhere stops: the largest shard's count
    assert glob["nfe"] == slow == local["nfe"] and glob["steps"] == local["steps"]
    its = np.asarray(glob["iterations"])
    assert max(its[:BATCH // 2]) + 1 == fast and max(its[BATCH // 2:]) + 1 == slow
    _assert_same_solve(local, glob, "uneven per-shard vs global")
    assert uneven["eager_per_shard"]["shard_nfe"] == local["shard_nfe"]
    _assert_close(uneven["eager_per_shard"]["z"], glob["z"], "per-shard outside jit")


def test_per_shard_bad_input_is_a_clear_error(uneven):
    errors = uneven["errors"]
    assert "multiple of the 2 shards" in errors["odd batch"] and "(3, 3)" in errors["odd batch"]
    assert "same batch size" in errors["batch mismatch"]
    assert errors["axis"].startswith("ValueError") and "'data' is not an axis" in errors["axis"]
    assert errors["mesh"].startswith("TypeError: deqcore_jax.solve_per_shard: mesh must be")
    assert "batched=False" in errors["batched"] and "backend='torch'" in errors["backend"]
    assert errors["option"].startswith("TypeError") and "memmory" in errors["option"]
    assert "no batch to split" in errors["no arrays"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_one_process_solve(mesh_solves):
    port = str(_free_port())
    env = {**os.environ, "JAX_ENABLE_X64": "1", "OMP_NUM_THREADS": "1"}
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    procs = [subprocess.Popen([sys.executable, __file__, "process", str(i), port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=240)
            assert proc.returncode == 0, stderr[-4000:]
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    ref = mesh_solves["anderson-array"]["one"]["implicit"]
    for out in outs:
        assert out["processes"] == 2
        for loop in ("global", "per_shard"):
            _assert_same_solve(out[loop], ref, f"two processes, {loop}")
    one_process = mesh_solves["anderson-array"]["per_shard"]["implicit"]
    assert outs[0]["per_shard"]["shard_nfe"] == one_process["shard_nfe"]


if __name__ == "__main__":
    check = sys.argv[1]
    if check == "mesh":
        result = _check_mesh_solves()
    elif check == "uneven":
        result = _check_uneven_shards()
    else:
        result = _multi_process_solve(int(sys.argv[2]), int(sys.argv[3]))
    print(json.dumps(result))
