"""Flattening a state (one array or a tuple of arrays) to a (batch, n) matrix and back."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from ._protocol import Backend


def leaves(obj: Any) -> list[Any]:
    """The arrays of ``obj``: itself, or the items of a tuple/list (nested), or dict values."""
    if isinstance(obj, (tuple, list)):
        return [leaf for item in obj for leaf in leaves(item)]
    if isinstance(obj, dict):
        return [leaf for item in obj.values() for leaf in leaves(item)]
    return [obj]


@dataclasses.dataclass(frozen=True)
class Structure:
    """The shapes and dtype of a state ``z``; converts it to (B, n) and back.

    With ``batched=True`` axis 0 of every array is the batch axis (all arrays share it); with
    ``batched=False`` the whole state is one sample (B = 1), as inside ``jax.vmap``.
    """

    is_tuple: bool
    shapes: tuple[tuple[int, ...], ...]
    dtype: Any
    batched: bool

    @functools.cached_property
    def batch(self) -> int:
        return self.shapes[0][0] if self.batched else 1

    @functools.cached_property
    def sizes(self) -> tuple[int, ...]:
        skip = 1 if self.batched else 0
        return tuple(math.prod(s[skip:]) for s in self.shapes)

    @functools.cached_property
    def n(self) -> int:
        return sum(self.sizes)

    @classmethod
    def of(cls, backend: Backend, z: Any, batched: bool, what: str = "z0") -> Structure:
        is_tuple = isinstance(z, (tuple, list))
        items = list(z) if is_tuple else [z]
        if not items:
            raise ValueError(f"deqcore.solve: {what} is an empty tuple")
        for i, item in enumerate(items):
            if not backend.is_array(item):
                where = f"{what}[{i}]" if is_tuple else what
                raise TypeError(
                    f"deqcore.solve: {where} must be a {backend.name} array, got {type(item).__name__}"
                )
        shapes = tuple(tuple(int(d) for d in item.shape) for item in items)
        dtypes = {item.dtype for item in items}
        if len(dtypes) != 1:
            raise TypeError(f"deqcore.solve: all arrays of {what} must share one dtype, got {dtypes}")
        dtype = dtypes.pop()
        if not backend.xp.isdtype(dtype, "real floating"):
            raise TypeError(f"deqcore.solve: {what} must have a real floating dtype, got {dtype}")
        if batched:
            for s in shapes:
                if len(s) < 2:
                    raise ValueError(
                        f"deqcore.solve: {what} has an array of shape {s}; with batched=True (the "
                        "default) axis 0 is the batch axis and each sample needs at least one more "
                        "axis. Reshape to (batch, features), or pass batched=False for one "
                        "unbatched state (for example inside jax.vmap)."
                    )
            if len({s[0] for s in shapes}) != 1:
                raise ValueError(f"deqcore.solve: arrays of {what} disagree on the batch size: {shapes}")
        return cls(is_tuple, shapes, dtype, batched)

    def flatten(self, backend: Backend, z: Any) -> Any:
        xp = backend.xp
        # explicit sizes: (batch, -1) is ambiguous for an empty batch
        if not self.is_tuple:
            return xp.reshape(z, (self.batch, self.n))
        flat = [xp.reshape(item, (self.batch, size)) for item, size in zip(z, self.sizes, strict=True)]
        return flat[0] if len(flat) == 1 else xp.concat(flat, axis=1)

    def unflatten(self, backend: Backend, zf: Any) -> Any:
        xp = backend.xp
        if not self.is_tuple:
            return xp.reshape(zf, self.shapes[0])
        out, start = [], 0
        for shape, size in zip(self.shapes, self.sizes, strict=True):
            out.append(xp.reshape(zf[:, start:start + size], shape))
            start += size
        return tuple(out)

    def _hint(self, defaulted: bool) -> str:
        # built only when raising: f's output is checked every step
        if defaulted:
            return (f" (z0 was not given, so it defaulted to zeros shaped like x, {self.describe()}; "
                    "pass z0= with the structure f returns)")
        return " (pass z0 with the structure f returns)"

    def describe(self) -> str:
        """The shapes and dtype, as a message shows them: ``(4, 3) float32`` or a tuple of shapes."""
        shapes = ", ".join(str(s) for s in self.shapes)
        return f"({shapes}) {self.dtype}" if self.is_tuple else f"{shapes} {self.dtype}"

    def check_output(self, backend: Backend, out: Any, ref: Any, defaulted: bool = False,
                     dtypes: tuple[Any, ...] = ()) -> None:
        """Raise a clear error unless ``f``'s output ``out`` matches this structure (and ``ref``'s device).

        ``defaulted``: z0 was not given but made as zeros like ``x``; the messages say so.
        ``dtypes``: the dtypes ``f`` may return (default: the state's only).
        """
        allowed = dtypes or (self.dtype,)
        if self.is_tuple != isinstance(out, (tuple, list)):
            kind = "a tuple" if self.is_tuple else "a single array"
            raise TypeError(f"deqcore.solve: f must return {kind} like z0, got {type(out).__name__}"
                            f"{self._hint(defaulted)}")
        items = list(out) if self.is_tuple else [out]
        if len(items) != len(self.shapes):
            raise ValueError(
                f"deqcore.solve: f returned {len(items)} arrays, z0 has {len(self.shapes)}"
                f"{self._hint(defaulted)}"
            )
        ref_device = backend.device(ref)
        for i, (item, shape) in enumerate(zip(items, self.shapes, strict=True)):
            name = f"f(z)[{i}]" if self.is_tuple else "f(z)"
            if not backend.is_array(item):
                raise TypeError(
                    f"deqcore.solve: {name} is a {type(item).__name__}, not a {backend.name} array"
                )
            if tuple(item.shape) != shape:
                raise ValueError(
                    f"deqcore.solve: {name} has shape {tuple(item.shape)}, z0 has {shape}"
                    f"{self._hint(defaulted)}"
                )
            if item.dtype not in allowed:
                also = f" (or f_dtype {allowed[1]})" if len(allowed) > 1 else ""
                raise TypeError(
                    f"deqcore.solve: {name} has dtype {item.dtype}, z0 has {self.dtype}{also}; make f "
                    "return the state's dtype (or pass z0 of the dtype f returns; to run f in a half "
                    "dtype, under torch.autocast or with half parameters, while the state stays "
                    "float32, pass f_dtype=)"
                    f"{self._hint(True) if defaulted else ''}"
                )
            device = backend.device(item)
            if ref_device is not None and device is not None and device != ref_device:
                raise ValueError(f"deqcore.solve: {name} is on device {device}, z0 on {ref_device}")
