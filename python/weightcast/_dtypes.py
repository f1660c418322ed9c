"""How weightcast spells a dtype given as text, a torch dtype or a numpy dtype: shared by the API
(``weightcast/__init__.py``, which binds it as ``_dtype_text``) and the profile
(:mod:`weightcast._profile`)."""

from typing import Any, Optional


def dtype_text(d: Any) -> Optional[str]:
    """A dtype given as text (``"f16"``), a torch dtype or a numpy dtype, as weightcast spells it."""
    if d is None or isinstance(d, str):
        return d
    name = str(d)
    if name.startswith("torch."):
        return name[len("torch."):]
    try:
        import numpy as np

        return np.dtype(d).name
    except Exception:
        return name
