"""The COVID-SemiSeg slices: their loader (``data``), Inf-Net's metric (``metric``), the cross-validation protocol
that trains 2D models with :mod:`covidseg.training.slices` (``train``) and the evaluation of a checkpoint
(``evaluate``)."""
