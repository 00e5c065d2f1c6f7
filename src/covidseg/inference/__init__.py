"""Inference: Gaussian-blended sliding windows (:mod:`.sliding_window`), stage-1 lungs (:mod:`.lungs`) and the
two-stage ``segment`` pipeline (:mod:`.pipeline`). Import the submodules directly (they pull in torch/scipy)."""
