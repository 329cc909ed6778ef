"""The built-in gradient modes, each written once over the backend protocol."""

from ._gdeq import GDEQ
from ._gdeq_refined import GDEQRefined
from ._implicit import Implicit
from ._jfb import JFB
from ._phantom import NPG, UPG
from ._reversible import Reversible
from ._unroll import Unroll

__all__ = ["GDEQ", "GDEQRefined", "JFB", "NPG", "UPG", "Implicit", "Reversible", "Unroll"]
