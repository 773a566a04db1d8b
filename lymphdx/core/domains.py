"""The two hospitals' domain ids: they index the domain-specific batch norm layers and
the per-scan domain tensors of a mixed batch."""

WEAK, STRONG = 0, 1  # the weak set (scan labels only), the strong set (ROI masks only)
