"""PSANet's point-wise attention mask re-arrangement (pure PyTorch, no compiled extension)."""
from lib.psa.mask import psa_mask, psa_mask_reference

__all__ = ["psa_mask", "psa_mask_reference"]
