"""Inference: loading models for a backend (:mod:`.backends`), Gaussian-blended sliding windows
(:mod:`.sliding_window`), stage-1 lungs (:mod:`.lungs`), the stages of ``segment`` (:mod:`.stages`), one case
(:mod:`.case`), its inputs (:mod:`.inputs`) and outputs (:mod:`.outputs`), the run (:mod:`.pipeline`) and cohorts
across processes (:mod:`.cohort`). Import the submodules directly (they pull in torch/scipy)."""
