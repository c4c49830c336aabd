import mmap

import numpy as np
import pytest

from edgeres.peakmem import can_measure, peak_rise

MIB = 2**20


@pytest.mark.skipif(not can_measure(), reason="the peak RSS is reset through /proc/self/clear_refs (Linux)")
def test_peak_rise_sees_a_buffer_of_this_process():
    def touch_new_pages():  # fresh anonymous pages (a heap buffer could reuse pages already resident here)
        with mmap.mmap(-1, 32 * MIB) as m:
            np.frombuffer(m, np.uint8)[:] = 1
            return None

    assert 30 * MIB <= peak_rise(touch_new_pages) < 40 * MIB  # (the baseline moves by some 100 KiB)
