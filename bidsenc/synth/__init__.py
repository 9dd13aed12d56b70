"""The demo dataset generator: BIDS story-listening fMRI with a known ground truth.

Used by ``bidsenc-demo`` and the tests. Its BOLD simulator is independent of
bidsenc's feature and alignment code.
"""

from .dataset import make_demo

__all__ = ["make_demo"]
