import numpy as np
import pytest

from data.intensity import ct_window_statistics, normalize_ct


def test_fixed_hounsfield_window_maps_onto_minus_one_to_one():
    hu = np.array([-1200.0, -1000.0, -300.0, 400.0, 900.0], dtype=np.float32)
    normalized = normalize_ct(hu, ct_window_statistics(-1000, 400))
    np.testing.assert_allclose(normalized, [-1.0, -1.0, 0.0, 1.0, 1.0], atol=1e-6)
    with pytest.raises(ValueError):
        ct_window_statistics(400, -1000)
