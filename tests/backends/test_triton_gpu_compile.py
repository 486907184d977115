"""The GPU-mode kernels (JIT, autotuned matmuls) compile for an H100 (sm_90) without a GPU.

The interpreter accepts programs a GPU compile rejects (tile shapes, dtype mixes), so this runs
the real Triton compiler down to a cubin with Triton's bundled `ptxas`: each kernel is launched
once on CPU tensors into a recorder, and its recorded arguments give the signature to compile.
About 30 s with a cold Triton cache (~/.triton/cache), 2 s warm.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

import meshc  # noqa: E402
from meshc.backends.triton.loader import load_kernel  # noqa: E402
from meshc.backends.triton.lowering import lower_program  # noqa: E402

from .test_triton_kernels import SwiGLU, _reductions, _sdpa, randn  # noqa: E402

POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.bool: "*i1"}


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kw)` records the call instead of running it."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((args, kw))


def compile_for_sm90(recorder: Recorder):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    (args, kw), kernel, options = recorder.calls[0], recorder.kernel, {}
    if type(kernel).__name__ == "Autotuner":  # compile its first config
        config = kernel.configs[0]
        kw, options = {**kw, **config.kwargs}, {"num_warps": config.num_warps, "num_stages": config.num_stages}
        kernel = kernel.fn
    signature, constexprs = {}, {}
    for name, a in zip(kernel.arg_names, args):
        if isinstance(a, torch.Tensor):
            signature[name] = POINTER[a.dtype]
        else:
            signature[name] = "fp32" if isinstance(a, float) else ("i32" if abs(a) < 2**31 else "i64")
    for name, v in kw.items():
        if name in ("num_warps", "num_stages"):
            options[name] = v
        else:
            signature[name], constexprs[name] = "constexpr", v
    return triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32), options=options)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = SwiGLU()
        self.w, self.b = torch.nn.Parameter(randn(37, seed=1)), torch.nn.Parameter(randn(37, seed=2))

    def forward(self, x, q, k, v, mask):
        return (*_reductions(self.mlp(x), self.w, self.b), _sdpa()(q, k, v, mask), _sdpa(is_causal=True)(q, k, v),
                _sdpa(enable_gqa=True)(q, k[:, :2], v[:, :2]))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_mode_kernels_compile_for_sm90(dtype):
    module = Block().to(dtype)
    q, k, v = (randn(2, 4, 37, 24, seed=s).to(dtype) for s in (3, 4, 5))
    inputs = (randn(2, 9, 37).to(dtype), q, k, v, randn(2, 1, 37, 37, seed=6) > 0)
    program = meshc.capture(module, inputs, dynamic_shapes=None)
    recorders = []

    def load(name, source, interpret):
        recorders.append(Recorder(load_kernel(name, source, interpret)))
        return recorders[-1]

    lowered = lower_program(program, interpret=False, load=load)
    assert {k.kind for k in lowered.kernels} == {"reduction", "matmul", "attention"} and not lowered.fallbacks
    with torch.no_grad():
        lowered(program.bind_inputs(inputs, {}))  # outputs are garbage (nothing ran); shapes are right
    for rec in recorders:
        assert rec.calls, "a kernel was never launched"
        compiled = compile_for_sm90(rec)
        assert compiled.asm.get("cubin"), "no cubin"
