"""Load generated Triton source as real kernels: write it to a cache file, import it, decorate.

Entry points: `import_triton() -> module` (a MeshcError saying what to install when Triton is
missing), `load_kernel(name, source, interpret) -> kernel`, `cache_dir()`.

`triton.jit` reads a kernel's source with `inspect`, so the source must live in a real file: each
kernel is written to `$MESHC_CACHE_DIR/triton/<name>_<hash>.py` (default `~/.cache/meshc`) and
imported from there. In Triton 3.x the interpreter is chosen when `@triton.jit` runs (it reads
`TRITON_INTERPRET` at decoration), so on CPU the variable is set around the import of the kernel
file, and the result is checked to be an interpreted function. This module never sets the
variable for the rest of the process.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

from meshc.errors import MeshcError

#: every kernel file starts with this. Kernels reduce with `tl.reduce(x, 1, _sum_combine)` instead of
#: `tl.sum`: Triton's `tl.sum` / `tl.max` / `tl.zeros` are @jit library functions, decorated when
#: `triton` is first imported, so in a process that imported Triton before TRITON_INTERPRET was set,
#: an interpreted kernel calling them fails ("Cannot call @triton.jit'd outside of the scope of a
#: kernel", Triton 3.9). The combine functions are Triton's own where it has them: the interpreter
#: reduces with numpy for exactly those objects (any other combine function runs element by element).
PRELUDE = """import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


_sum_combine = getattr(tl.standard, "_sum_combine", _add)
_max_combine = getattr(tl.standard, "_elementwise_max", _maximum)


"""


def import_triton():
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        raise MeshcError(
            f"backend='triton' needs the `triton` package, which cannot be imported here ({type(e).__name__}: {e}). "
            f"Install it with `pip install 'triton>=3.6'` (Linux x86_64), or use backend='aten'.") from e
    return triton


def cache_dir() -> Path:
    root = Path(os.environ.get("MESHC_CACHE_DIR") or Path.home() / ".cache" / "meshc")
    path = root / "triton"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _interpret_env(on: bool) -> Iterator[None]:
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def load_kernel(name: str, source: str, interpret: bool):
    """Write `source` (which defines `name`) to the cache and return the decorated kernel."""
    import_triton()
    text = PRELUDE + source
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}_{digest}.py"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)  # atomic: ranks compiling the same kernel never read half a file
    spec = importlib.util.spec_from_file_location(f"meshc_triton_{name}_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    with _interpret_env(interpret):
        spec.loader.exec_module(module)
    kernel = getattr(module, name)
    if interpret and type(kernel).__name__ != "InterpretedFunction":
        from triton.runtime.interpreter import InterpretedFunction

        kernel = InterpretedFunction(getattr(kernel, "fn", kernel))
    return kernel
