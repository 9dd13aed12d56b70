"""The BIDS-Derivatives dataset bidsenc writes, and reading it back for the group level."""

from .dataset import write_dataset_files
from .participant import PartialOutputError, complete_outputs, participant_labels, read_participant, write_participant

__all__ = ["PartialOutputError", "complete_outputs", "participant_labels", "read_participant", "write_dataset_files",
           "write_participant"]
