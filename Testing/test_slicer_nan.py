"""A CT volume node with scattered NaN voxels is segmented (NaN as air, said so) in both Logic paths;
the node itself is left as it was; an all-NaN volume is refused with one clear message."""

from __future__ import annotations

import numpy as np
import pytest
from slicer_helpers import ijk_to_ras, node_array_ijk

from VNetSegmentationLib import SegmentationOptions, checks


@pytest.fixture
def nan_ct(env, ct_dir):
    ct = env.load_volume(ct_dir / "example_ct_sm.nii.gz", "sm-for-nan")
    array = node_array_ijk(ct).astype(np.float32)
    array[:8] = np.nan  # a resampled CT's outside-the-field-of-view strip
    return env.add_volume(array, ijk_to_ras(ct), "sm-with-nan")


@pytest.mark.parametrize("background", [False, True])
def test_nan_voxels_are_air_with_a_warning_and_the_node_is_untouched(nan_ct, logic, tiny_model_file, background):
    before = node_array_ijk(nan_ct).copy()
    assert checks.checkCtLike(before) is None  # the pre-run check looks past the NaN voxels
    seg, result = logic.segment(nan_ct, tiny_model_file, SegmentationOptions("cpu"), background=background)
    texts = [w.message for w in result.warnings]
    assert any(t.startswith("24240 NaN voxel(s) (6.6 % of the image") and "treated as air (-1000 HU)" in t for t in texts), texts
    after = node_array_ijk(nan_ct)
    assert np.isnan(after[:8]).all() and np.array_equal(after[8:], before[8:])
    assert seg.GetSegmentation().GetNumberOfSegments() == 1


def test_all_nan_volume_is_refused(env, logic, tiny_model_file):
    node = env.add_volume(np.full((20, 20, 12), np.nan, np.float32), np.diag([2.0, 2.0, 3.0, 1.0]), "all-nan")
    with pytest.raises(ValueError, match="is all NaN"):
        logic.segment(node, tiny_model_file, SegmentationOptions("cpu"))
