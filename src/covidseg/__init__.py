"""covidseg: COVID-19 infection and lung segmentation in chest CT.

Implements the 3D U-Net with Feature Variation attention (SE or CE channel branch), Progressive ASPP and
deep supervision of Lin & Huang's report, after Yan et al., IEEE Trans. Big Data 7(1), 2021.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
