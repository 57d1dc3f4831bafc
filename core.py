"""Randomized smoothing over denoise->classify (Cohen et al. 2019; Carlini et al. 2023) and the FT-CADIS objective.

The two halves of this module:

* certification: :class:`DenoisedClassifier` (f o D on noisy inputs) and :class:`Smooth` (CERTIFY / PREDICT);
* fine-tuning: :func:`cadis_loss` (confidence-aware selective CE + masked adversarial loss) and
  :func:`denoised_attack` (the adversarial search on the denoised residual), SPEC section 4.
"""
from __future__ import annotations

# ---------------------------------------------------------------------------------------------------------------
# Section 1: smoothing and certification
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# Section 2: the FT-CADIS objective
# ---------------------------------------------------------------------------------------------------------------
