"""Datasets (TFDS builders for VOC and COCO, image folders) and batching. All I/O lives here."""
