"""What the measuring calls (:func:`weightcast.profile`, :func:`weightcast.rescale`) return: a
dict of plain values (``to_dict()``, JSON-ready) whose keys read as attributes."""

from typing import Any, Dict


class Measured:
    """A measured result: ``to_dict()``, and each key as an attribute."""

    def __init__(self, d: Dict[str, Any]):
        self._d = d

    def to_dict(self) -> Dict[str, Any]:
        return self._d

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_d":
            raise AttributeError(name)
        try:
            return self._d[name]
        except KeyError:
            raise AttributeError(name) from None
