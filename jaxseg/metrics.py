"""Confusion matrix, Hungarian matching and mIoU."""
