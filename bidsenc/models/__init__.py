"""Model fitting and evaluation: arrays in, arrays out (no BIDS, no files)."""
