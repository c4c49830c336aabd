import numpy as np
import pytest

from edgeres.peakmem import can_measure, peak_rise

MIB = 2**20


@pytest.mark.skipif(not can_measure(), reason="the peak RSS is reset through /proc/self/clear_refs (Linux)")
def test_peak_rise_sees_a_buffer_of_this_process():
    rise = peak_rise(lambda: np.ones(32 * MIB, np.uint8))  # touched pages: resident while it lives
    assert 28 * MIB <= rise < 40 * MIB  # (free heap pages already resident may serve a little of it)
