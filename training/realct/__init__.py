"""Training subjects built from the real CTs in ``../shared/data/ct`` (two patients, TotalSegmentator labels).

Modules: :mod:`.anatomy` (label tables, tissue HU per contrast phase), :mod:`.sources` (the real
scans), :mod:`.augment` (random views: field of view, affine + elastic deformation, degradations),
:mod:`.synth` (contrast-phase changes and synthetic CTs from label maps), :mod:`.build` (subjects
and MSD task folders), :mod:`.evaluate` (Dice, HD95, volume error, anatomical checks).
"""
