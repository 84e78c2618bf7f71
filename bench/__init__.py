"""`make bench` (``python -m bench``): the measured figures of DESIGN.md §5 beside their targets (docs/proof.md)."""
