"""k-means: batched, vmappable, masked, and streamed at dataset scale."""
