import pytest
import torch

from wan_kernel.attention_inputs import check_attention_inputs, half_precision
from wan_kernel.errors import InputError


def qkv(*shape, dtype=torch.float32):
    return (torch.zeros(shape, dtype=dtype) for _ in range(3))


def test_cuda_backends_refuse_cpu_tensors_and_point_to_sdpa():
    q, k, v = qkv(1, 4, 2, 8)
    with pytest.raises(InputError, match="CUDA tensors only.*sdpa"):
        check_attention_inputs(q, k, v, backend="xformers")
    check_attention_inputs(q, k, v, backend="mine", device_type=None)  # any device accepted


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((1, 4, 2, 8), (1, 4, 2), (1, 4, 2)), r"\[batch, length, heads, head_dim\]"),
        (((1, 4, 2, 8), (1, 5, 2, 8), (1, 6, 2, 8)), "must share"),
        (((2, 4, 2, 8), (1, 4, 2, 8), (1, 4, 2, 8)), "must share"),
        (((1, 4, 2, 8), (1, 4, 3, 8), (1, 4, 3, 8)), "must share"),
    ],
)
def test_shape_mismatches_are_named(shapes, message):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(InputError, match=message):
        check_attention_inputs(q, k, v, backend="x", device_type=None)


def test_integer_tensors_are_refused():
    q, k, v = qkv(1, 4, 2, 8, dtype=torch.int32)
    with pytest.raises(InputError, match="floating-point"):
        check_attention_inputs(q, k, v, backend="x", device_type=None)


def test_half_precision_keeps_half_dtypes_and_lowers_fp32_to_bf16():
    q = torch.zeros(1, 2, 1, 8)
    assert {t.dtype for t in half_precision(q, q, q)} == {torch.bfloat16}
    assert {t.dtype for t in half_precision(q.half(), q, q)} == {torch.float16}
    assert {t.dtype for t in half_precision(q.bfloat16(), q, q)} == {torch.bfloat16}


def test_key_lengths_normalises_and_checks():
    from wan_kernel.attention_inputs import key_lengths

    assert key_lengths(None, 2, 6) is None
    assert key_lengths(torch.tensor([6, 6]), 2, 6) is None  # nothing masked: fast path
    assert key_lengths(torch.tensor([6, 3]), 2, 6) == [6, 3]
    with pytest.raises(InputError, match="between 1 and the key length 6"):
        key_lengths(torch.tensor([0, 6]), 2, 6)
    with pytest.raises(InputError, match="one per sample"):
        key_lengths(torch.tensor([6, 6, 6]), 2, 6)
    with pytest.raises(InputError, match="integer tensor"):
        key_lengths(torch.tensor([6.0, 3.0]), 2, 6)
