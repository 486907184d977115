"""Every kind of kernel the Triton backend generates, against eager, on CPU (Triton interpreter).

Shapes are small, and include non-power-of-two sizes, masked tails, broadcasting (stride 0) and
transposed inputs. fp32 within rtol=1e-5, atol=1e-5 everywhere but the chain of three matmuls
(rtol=1e-4: its summation-order bound).
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import meshc  # noqa: E402
from meshc.backends.triton import lower  # noqa: E402


def run_lowered(module: torch.nn.Module, *inputs):
    program = meshc.capture(module, inputs, dynamic_shapes=None)
    lowered = lower(program, interpret=True)
    out = program.unflatten_outputs(lowered(program.bind_inputs(inputs, {})))
    return lowered, out


def check(module, *inputs, rtol=1e-5, atol=1e-5):
    lowered, out = run_lowered(module, *inputs)
    with torch.no_grad():
        ref = module(*inputs)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    return lowered


class Fn(torch.nn.Module):
    def __init__(self, fn, params=()):
        super().__init__()
        self.fn = fn
        self.ps = torch.nn.ParameterList(params)

    def forward(self, *xs):
        return self.fn(*xs, *self.ps)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


UNARY = {
    "neg": lambda x: -x, "reciprocal": lambda x: torch.reciprocal(x.abs() + 0.5), "exp": torch.exp,
    "log": lambda x: torch.log(x.abs() + 0.1), "sqrt": lambda x: torch.sqrt(x.abs()),
    "rsqrt": lambda x: torch.rsqrt(x.abs() + 0.1), "abs": torch.abs, "cos": torch.cos, "sin": torch.sin,
    "erf": torch.erf, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "silu": F.silu, "relu": F.relu,
    "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "pow2": lambda x: x.pow(2),
    "pow3": lambda x: x.pow(3.0), "pow_half": lambda x: x.abs().pow(0.5), "pow_neg1": lambda x: (x.abs() + 1).pow(-1),
    "clamp": lambda x: x.clamp(-0.5, 0.7), "clone": lambda x: x.clone() * 2, "div_scalar": lambda x: x / 3.0,
    "rsub": lambda x: 1.0 - x,
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(UNARY))
def test_pointwise_op(name):
    lowered = check(Fn(UNARY[name]), randn(3, 5, 37) * 2)
    assert [k.kind for k in lowered.kernels] == ["pointwise"] and not lowered.fallbacks


@pytest.mark.timeout(120)
def test_pointwise_broadcasting_transposed_and_binary_ops():
    a, b, c = randn(5, 7, 37, seed=1), randn(37, seed=2), randn(7, 1, seed=3)
    d = randn(37, 7, 5, seed=4).permute(2, 1, 0)  # strided view, never contiguous

    def fn(a, b, c, d):
        return torch.add(a, b, alpha=2) - c * d / (d.abs() + 1), torch.maximum(a, d) + torch.minimum(b, c)

    lowered = check(Fn(fn), a, b, c, d)
    # the first output's five ops merge into one kernel; maximum and minimum(b, c) (another shape) are two more
    assert [k.kind for k in lowered.kernels] == ["pointwise"] * 3, [k.name for k in lowered.kernels]


@pytest.mark.timeout(120)
def test_pointwise_tiles_long_rows_with_a_masked_tail():
    lowered = check(Fn(lambda x, y: F.silu(x) * y), randn(2, 9001), randn(9001, seed=1))  # > one column block
    assert lowered.kernels[0].kind == "pointwise"


def _reductions(x, w, b):
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    return (x.sum(-1), x.sum(-1, keepdim=True), x.mean(-1), x.amax(-1, keepdim=True), torch.softmax(x, -1),
            torch.log_softmax(x, -1), F.layer_norm(x, (x.shape[-1],), w, b), F.layer_norm(x, (x.shape[-1],)), rms)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shape", [(3, 5, 37), (4, 129), (6, 1), (2, 3, 1000)], ids=str)
def test_reductions_over_the_last_dim(shape):
    n = shape[-1]
    module = Fn(_reductions, [torch.nn.Parameter(randn(n, seed=1)), torch.nn.Parameter(randn(n, seed=2))])
    x = randn(*shape) * 3
    lowered, out = run_lowered(module, x)
    with torch.no_grad():
        ref = module(x)
    torch.testing.assert_close(out[3:], ref[3:], rtol=1e-5, atol=1e-5)
    # sums and means: the kernel adds in another order than eager (a tree over the row); with
    # cancellation neither is within 1e-5 relative of the exact sum, so both are held to the fp32
    # summation bound against a float64 reference: |error| <= 1e-6 * sum(|x|) over the row
    exact = x.double().sum(-1)
    bound = 1e-6 * x.double().abs().sum(-1)
    for got, scale in ((out[0], 1), (out[1].squeeze(-1), 1), (out[2], n)):
        assert ((got.double() * scale - exact).abs() <= bound).all(), (got.double() * scale - exact).abs().max()
    assert {k.kind for k in lowered.kernels} == {"reduction"} and not lowered.fallbacks
    names = " ".join(k.name for k in lowered.kernels)
    assert "rmsnorm" in names and "layernorm" in names and "softmax" in names


def _linear(n, k, bias):
    lin = torch.nn.Linear(k, n, bias=bias)
    torch.nn.init.normal_(lin.weight, generator=torch.Generator().manual_seed(n + k))
    return lin


@pytest.mark.timeout(120)
@pytest.mark.parametrize("m, k, n", [(5, 37, 19), (70, 300, 130)], ids=str)  # 2nd: several tiles, K tail
@pytest.mark.parametrize("bias", [False, True])
def test_matmul_linear(m, k, n, bias):
    lowered = check(_linear(n, k, bias), randn(m, k))
    assert [k.kind for k in lowered.kernels] == ["matmul"]


class SwiGLU(torch.nn.Module):
    def __init__(self, d=37, h=53):
        super().__init__()
        self.gate, self.up, self.down = _linear(h, d, False), _linear(h, d, False), _linear(d, h, False)

    def forward(self, x):
        return x + self.down(F.silu(self.gate(x)) * self.up(x))  # gating and residual in epilogues


@pytest.mark.timeout(120)
def test_matmul_epilogues_swiglu_and_residual():
    # three chained fp32 matmuls with N(0, 1) weights (values up to ~50): summation order alone moves a
    # value by ~K * 2^-24 * 50 ~ 1e-4 (eager's BLAS picks its order by thread count: 6e-5 was seen once)
    lowered = check(SwiGLU(), randn(2, 9, 37), rtol=1e-4)
    names = [k.name for k in lowered.kernels]
    assert [k.kind for k in lowered.kernels] == ["matmul"] * 3, names
    assert any("silu_mul" in n for n in names) and any(n.startswith("triton_mm_add") for n in names), names


@pytest.mark.timeout(120)
def test_addmm_mm_bmm_matmul_with_activation_epilogue():
    w, bias, w2 = randn(37, 45, seed=1), randn(45, seed=2), randn(45, 21, seed=3)

    def fn(x, y, z):
        h = F.gelu(torch.addmm(bias, x, w), approximate="tanh")
        return torch.mm(h, w2), torch.relu(torch.bmm(y, z)) * 2, x @ w

    lowered = check(Fn(fn), randn(33, 37), randn(3, 17, 24, seed=4), randn(3, 24, 19, seed=5))
    assert sum(k.kind == "matmul" for k in lowered.kernels) == 4, [k.name for k in lowered.kernels]


def _sdpa(**kw):
    return lambda q, k, v, *mask: F.scaled_dot_product_attention(q, k, v, *mask, **kw)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["bool_mask", "float_mask", "causal", "gqa_scale", "no_mask"])
def test_flash_attention(case):
    b, h, m, nk, d = 2, 4, 37, 70, 24  # several key blocks, non-power-of-two head dim, masked tails
    q, k, v = randn(b, h, m, d, seed=1), randn(b, h, nk, d, seed=2), randn(b, h, nk, d, seed=3)
    if case == "bool_mask":
        mask = randn(b, 1, m, nk, seed=4) > 0
        mask[..., 0] = True
        args, fn = (q, k, v, mask), _sdpa()
    elif case == "float_mask":
        args, fn = (q, k, v, randn(m, nk, seed=5)), _sdpa()
    elif case == "causal":
        args, fn = (q, k[:, :, :m], v[:, :, :m]), _sdpa(is_causal=True)
    elif case == "gqa_scale":
        args, fn = (q, k[:, :2], v[:, :2]), _sdpa(enable_gqa=True, scale=0.3)
    else:
        args, fn = (q, k, v), _sdpa()
    lowered = check(Fn(fn), *args)
    assert [k.kind for k in lowered.kernels] == ["attention"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("m, mask_kind", [(1, "float"), (5, "bool")])
def test_flash_decoding_splits_the_keys_and_merges_the_chunks(m, mask_kind):
    """Decode (1 query row) and tree verification (5 rows) over 300 cached keys: the keys run as
    several chunks (flash-decoding) and the merge equals eager, also for a row whose first chunk is
    entirely masked and with grouped-query heads."""
    from meshc.backends.triton.attention import splits_for

    b, h, nk, d = 1, 4, 300, 24
    assert splits_for(b * h, m, nk) > 1
    q, k, v = randn(b, h, m, d, seed=1), randn(b, 2, nk, d, seed=2), randn(b, 2, nk, d, seed=3)
    if mask_kind == "bool":
        mask = randn(b, 1, m, nk, seed=4) > -0.5
        mask[:, :, 0, :200] = False  # row 0 sees only the last chunk(s)
    else:
        mask = torch.zeros(b, 1, m, nk)
        mask[..., 250:] = float("-inf")  # a cache filled up to 250
    lowered = check(Fn(_sdpa(enable_gqa=True)), q, k, v, mask)
    assert [k.kind for k in lowered.kernels] == ["attention"]


@pytest.mark.timeout(120)
def test_unsupported_dtype_falls_back_to_aten_with_the_reason():
    x = randn(4, 7).double()
    lowered = check(Fn(lambda x: torch.softmax(x * 2, -1)), x)
    assert not lowered.kernels
    reasons = {reason for _, reason in lowered.fallbacks}
    assert any("dtype float64" in r and "float32/float16/bfloat16" in r for r in reasons), reasons


@pytest.mark.timeout(120)
def test_rows_too_long_for_one_block_fall_back_to_aten_with_the_reason():
    lowered = check(Fn(lambda x: torch.softmax(x, -1) * 2), randn(2, 20000))
    assert [k.kind for k in lowered.kernels] == ["pointwise"]  # the * 2 after the softmax
    assert any("last dim of 20000 > 16384" in r for _, r in lowered.fallbacks), lowered.fallbacks


@pytest.mark.timeout(120)
def test_kernels_carry_provenance_and_real_source():
    lowered = check(Fn(lambda x: F.silu(x) * 2), randn(3, 5))
    kernel = lowered.kernels[0]
    assert kernel.name.startswith("triton_silu_mul_")
    assert "@triton.jit" in kernel.source and "# fuses 2 FX node(s):" in kernel.source
    assert any("test_triton_kernels.py" in line for line in kernel.source_lines), kernel.source_lines
    assert kernel.name in lowered.gm.code  # the lowered graph calls the kernel by name



def _bf16_case(case: str):
    if case == "linear_silu":
        lin = _linear(53, 37, True).to(torch.bfloat16)
        module = Fn(lambda x: F.silu(lin(x)))
        module.lin = lin
        return module, (randn(3, 5, 37).bfloat16(),)
    if case == "rmsnorm":
        def rms(x, w):
            return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * w

        return Fn(rms, [torch.nn.Parameter(randn(37).bfloat16())]), (randn(3, 5, 37).bfloat16(),)
    return Fn(_sdpa(is_causal=True)), tuple(randn(2, 4, 37, 24, seed=s).bfloat16() for s in (1, 2, 3))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["linear_silu", "rmsnorm", "attention"])
def test_bfloat16_kernels(case):
    """bf16 (the GPU dtype): inputs, outputs and every bf16 node are rounded as in eager, the math in
    between is fp32. Compared with torch's bf16 tolerance (rtol 1.6e-2; one bf16 ulp is 2**-8 ~ 3.9e-3
    relative) and atol 1e-2 for values near zero, where another accumulation order flips a rounding."""
    module, args = _bf16_case(case)
    lowered = check(module, *args, rtol=1.6e-2, atol=1e-2)
    assert lowered.kernels and not lowered.fallbacks
