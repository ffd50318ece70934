import pytest
import torch

from dsx.parallel.codecs import (
    WINDOW, IntCodec, RawCodec, TopKCodec, TwoFourCodec, dequantize, pack_bits, quantize, topk_compress, unpack_bits,
)


def test_int8_roundtrip_is_within_half_a_step_per_chunk():
    x = torch.randn(3, 2500) * torch.logspace(-3, 1, 2500)
    x[1, :512] = 0
    q, scales = quantize(x, 512)
    assert q.dtype == torch.int8 and q.shape == x.shape and scales.shape == (3, 5)
    assert q.abs().max() == 127 and torch.equal(scales[1, 0], torch.tensor(0.0))
    step = scales.repeat_interleave(512, -1)[:, :2500]
    assert ((dequantize(q, scales, 512) - x).abs() <= step / 2 + 1e-7).all()
    assert torch.equal(dequantize(q, scales, 512)[1, :512], torch.zeros(512))
    flat_q, flat_scales = quantize(x[0], 1024)
    assert flat_scales.shape == (3,) and torch.equal(flat_scales[2], x[0, 2048:].abs().max() / 127)


def test_int8_sends_non_finite_entries_as_nan_without_spoiling_their_chunk():
    x = torch.randn(2, 64)
    bad = x.clone()
    bad[0, 3], bad[1, 10], bad[1, 11] = float("inf"), float("nan"), float("-inf")
    q, scales = quantize(bad, 32)
    assert torch.equal(scales, quantize(x.masked_fill(~torch.isfinite(bad), 0), 32)[1])
    out = dequantize(q, scales, 32)
    assert torch.isnan(out[~torch.isfinite(bad)]).all() and torch.isfinite(out[torch.isfinite(bad)]).all()
    good = dequantize(*quantize(x, 32), 32)
    same_scale = (scales == quantize(x, 32)[1]).repeat_interleave(32, -1)
    finite = torch.isfinite(bad) & same_scale
    assert torch.equal(out[finite], good[finite])


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_bits_pack_densely_and_unpack_exactly(bits):
    codes = torch.randint(0, 1 << bits, (3, 37), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, -(-37 * bits // 8))
    assert torch.equal(unpack_bits(packed, bits, 37), codes)


@pytest.mark.parametrize("bits, chunk", [(4, 64), (8, 7)])
def test_int_codec_is_within_half_a_step_and_sends_nan(bits, chunk):
    x = torch.randn(2, 301)
    x[1, 5] = float("nan")
    codec = IntCodec(chunk, bits)
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.shape == (2, codec.size(301))
    assert codec.size(301) == -(-301 * bits // 8) + 4 * -(-301 // chunk)
    out = codec.decode(payload, 301)
    scales = quantize(x, chunk, bits)[1].repeat_interleave(chunk, -1)[:, :301]
    finite = torch.isfinite(x)
    assert torch.isnan(out[1, 5]) and ((out - x).abs()[finite] <= scales[finite] / 2 + 1e-6).all()


def test_raw_codec_clamps_finite_overflow_and_keeps_inf():
    x = torch.tensor([1e6, -1e6, float("inf"), float("nan"), 0.5])
    out = RawCodec(torch.float16).decode(RawCodec(torch.float16).encode(x), 5)
    assert out[:2].tolist() == [65504.0, -65504.0] and out[2] == float("inf") and torch.isnan(out[3])
    assert out[4] == 0.5


def test_topk_keeps_the_largest_magnitudes_in_ascending_order():
    x = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.0, 4.0, 0.05, -1.0, 0.4])
    values, indices = topk_compress(x, 0.3)
    assert indices.tolist() == [1, 3, 6] and torch.equal(values, x[indices])
    assert topk_compress(x, 1e-6)[0].numel() == 1 and topk_compress(x, 1.0)[0].numel() == 10
    codec = TopKCodec(0.3)
    two = codec.decode(torch.stack([codec.encode(x), codec.encode(-2 * x)]), 10)
    assert torch.equal(two[0], torch.where(x.abs() >= 2, x, torch.zeros(()))) and torch.equal(two[1], -2 * two[0])


@pytest.mark.parametrize("length, fraction, bitmap", [(9610, 0.01, False), (3 * WINDOW + 5, 0.01, False),
                                                      (1000, 0.1, True), (170, 1.0, True)])
def test_topk_positions_are_uint16_offsets_or_a_bitmap_and_decode_exactly(length, fraction, bitmap):
    x = torch.randn(length)
    x[-1] = 100.0  # a position in the last window
    codec = TopKCodec(fraction)
    payload = codec.encode(x)
    values, indices = topk_compress(x, fraction)
    k = values.numel()
    positions = payload.numel() - 4 * k
    assert payload.numel() == codec.size(length)
    assert positions == (-(-length // 8) if bitmap else 2 * k + 4 * -(-length // WINDOW))
    out = codec.decode(payload, length)
    assert torch.equal(out[indices], values) and int((out != 0).sum()) == k


def test_topk_4bit_payload_is_over_100x_smaller_than_fp32_and_within_half_a_step():
    x = torch.randn(9610)
    codec = TopKCodec(0.01, bits=4)
    payload = codec.encode(x)
    assert 9610 * 4 / payload.numel() >= 150  # 97 values: 49 B of codes, 8 B of scales, 198 B of positions
    values, indices = topk_compress(x, 0.01)
    out = codec.decode(payload, 9610)
    step = quantize(values, 64, 4)[1].repeat_interleave(64)[:values.numel()]
    assert ((out[indices] - values).abs() <= step / 2 + 1e-6).all()
    assert int((out != 0).sum()) <= values.numel() and out[x.abs() < values.abs().min()].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_two_four_keeps_the_two_largest_of_each_group_with_2_bit_positions(dtype):
    x = torch.randn(2, 4 * 25 + 3)
    x[0, 9] = float("nan")
    codec = TwoFourCodec(dtype)
    payload = codec.encode(x)
    assert payload.shape == (2, codec.size(103)) and codec.size(103) == 26 * 2 * 2 + 13  # 4.5 bytes per 4 entries
    out = codec.decode(payload, 103)
    groups = torch.nn.functional.pad(x, (0, 1)).view(2, 26, 4)
    kept = groups.abs().nan_to_num(float("inf")).topk(2, -1).indices
    expected = torch.zeros_like(groups).scatter_(-1, kept, groups.gather(-1, kept).to(dtype).float())
    assert torch.equal(out.nan_to_num(7.0), expected.flatten(-2)[:, :103].nan_to_num(7.0))
    assert torch.isnan(out[0, 9]) and ((out != 0).view(2, -1)[:, :100].reshape(2, 25, 4).sum(-1) <= 2).all()
