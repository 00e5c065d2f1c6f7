"""Image input and output: the canonical volume (:mod:`.volume`), file names (:mod:`.formats`), NIfTI
(:mod:`.image`), DICOM series (:mod:`.dicom`), 3D Slicer segmentations (:mod:`.slicer`) and atomic writes
(:mod:`.atomic`)."""
