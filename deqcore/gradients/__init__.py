"""The built-in gradient modes, each written once over the backend protocol."""

from ._gdeq import GDEQ
from ._implicit import Implicit
from ._jfb import JFB
from ._phantom import NPG, UPG
from ._unroll import Unroll

__all__ = ["GDEQ", "JFB", "NPG", "UPG", "Implicit", "Unroll"]
