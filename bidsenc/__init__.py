"""bidsenc: voxelwise encoding models of story-listening fMRI, as a BIDS App."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bidsenc")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
