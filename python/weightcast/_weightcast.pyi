"""Type stubs of the Rust extension (the public API is in ``weightcast/__init__.py``)."""

from typing import Any, Callable, List, Optional, Sequence, Tuple

__version__: str

class Error(Exception): ...
class InvalidFileError(Error): ...
class RefusedError(Error): ...
class UsageError(Error): ...

_Rules = List[Tuple[str, str]]
_Progress = Optional[Callable[[int, int], Any]]

def inspect(path: str, key: Optional[str] = None) -> str: ...
def convert(
    src: str, dst: str, to: Optional[str], rules: _Rules, on_overflow: str,
    max_underflow: Optional[float], auto: Optional[float], max_shard_size: Optional[str],
    key: Optional[str], inference: bool, strip_prefix: Optional[str], dry_run: bool,
    force: bool, progress: _Progress, cast_optimizer: bool, strict: bool, on_quantized: str,
    scale: Optional[str], scale_format: Optional[str], sync: bool, strict_rules: bool,
    part: Optional[str] = None, state_dict_only: bool = False,
) -> str: ...
def analyze(
    path: str, to: Optional[str], rules: _Rules, key: Optional[str], scale: Optional[str],
    scale_format: str, lossy_below: float, report: Optional[str], progress: _Progress,
) -> str: ...
def diff(a: str, b: str, tolerance: Optional[float] = None) -> str: ...
def audit(paths: Sequence[str], strict: bool = False) -> str: ...
def plan_memory(
    tensors: List[Tuple[str, str, List[int], int, int, Any]], classes: List[Optional[str]],
    to: Optional[str], rules: _Rules, on_overflow: str,
) -> str: ...
def save(
    dst: str, tensors: List[Tuple[str, str, List[int], int, int, Any]],
    metadata: List[Tuple[str, str]], to: Optional[str], rules: _Rules, on_overflow: str,
    max_shard_size: Optional[str], force: bool, progress: _Progress,
) -> str: ...

class Loader:
    warnings: List[str]
    def __init__(
        self, path: str, dtype: Optional[str], rules: _Rules, key: Optional[str],
        on_overflow: str, strip_prefix: Optional[str],
    ) -> None: ...
    def views(self) -> List[Tuple[str, int, str, List[int], List[int], int]]: ...
    def fill(self, progress: _Progress = None) -> Tuple[List[bytearray], List[Tuple[str, int]]]: ...
