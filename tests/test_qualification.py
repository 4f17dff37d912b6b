"""I/O and EPT exit qualifications bit by bit (SDM Vol. 3C Tables 28-5, 28-7). No Unicorn."""

import pytest

from hvm.qualification import EPT_READ, EPT_WRITE, decode_io, encode_ept, encode_io


def test_the_three_examples_from_the_design():
    assert encode_io(0xE9, 1, direction_in=False) == 0x00E90000              # out dx, al
    assert encode_io(0xF4, 1, direction_in=False, immediate=True) == 0x00F40040  # out 0xF4, al
    assert encode_io(0xE9, 1, direction_in=False, string=True, rep=True) == 0x00E90030  # rep outsb


@pytest.mark.parametrize("size,bits", [(1, 0), (2, 1), (4, 3)])
def test_size_field_is_size_minus_one(size, bits):
    assert encode_io(0x60, size, True) & 7 == bits
    assert encode_io(0x60, size, True) & 8 == 8


def test_decode_inverts_encode():
    q = decode_io(encode_io(0x1F0, 2, True, string=True, rep=True))
    assert (q.port, q.size, q.direction, q.string, q.rep, q.immediate) == (0x1F0, 2, "in", True, True, False)


@pytest.mark.parametrize("bad", [dict(port=0x10000, size=1), dict(port=0, size=3), dict(port=-1, size=1)])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(ValueError):
        encode_io(direction_in=False, **bad)


def test_ept_qualification_says_read_or_write():
    assert encode_ept(read=False, write=True, fetch=False) & (EPT_READ | EPT_WRITE) == EPT_WRITE
    assert encode_ept(read=True, write=False, fetch=False) & 7 == EPT_READ
    assert encode_ept(False, False, True) & 7 == 4
