"""The one size-divisor check (covidseg.models.shapes) and the messages built on it."""

from __future__ import annotations

import pytest

from covidseg.errors import ConfigError
from covidseg.models.shapes import fit_size, fits, format_size


@pytest.mark.parametrize("sizes, divisor, ok, fit", [
    ((8, 128, 128), (4, 16, 16), True, (8, 128, 128)),
    ((6, 30, 32), (4, 4, 4), False, (8, 32, 32)),
    ((2, 5), (4, 4), False, (4, 8)),  # smaller than the divisor: the divisor itself
    ((0, 16), (4, 16), False, (4, 16)),
    ((17,), (1,), True, (17,)),
])
def test_fit_rounds_up_to_the_divisor(sizes, divisor, ok: bool, fit) -> None:
    assert fits(sizes, divisor) is ok
    assert fit_size(sizes, divisor) == fit
    assert fits(fit_size(sizes, divisor), divisor)
    assert all(f >= s for f, s in zip(fit, sizes, strict=True))


def test_axes_must_agree_and_sizes_print() -> None:
    with pytest.raises(ConfigError, match="axes but the model pools"):
        fits((8, 128, 128), (16, 16))
    with pytest.raises(ConfigError, match="axes but the model pools"):
        fit_size((128, 128), (4, 16, 16))
    assert format_size((8, 128, 128)) == "8x128x128" and format_size((8, 32), " ") == "8 32"


def test_model_and_window_messages_suggest_the_same_fit() -> None:
    import numpy as np

    from covidseg.config import InferenceConfig, ModelConfig
    from covidseg.errors import InputError
    from covidseg.inference.sliding_window import predict_volume
    from covidseg.models import create_model

    model = create_model(ModelConfig(base_width=4, depth=2))  # divisor (4, 4, 4)
    assert model.size_divisor == (4, 4, 4)
    with pytest.raises(InputError, match=r"8x32x36: pad or crop"):
        model.check_input_shape((1, 1, 6, 30, 33))
    with pytest.raises(ConfigError, match="use --set inference.window=8x32x36"):
        predict_volume(model, np.zeros((8, 32, 36), np.float32), InferenceConfig(window=(6, 30, 33)))
