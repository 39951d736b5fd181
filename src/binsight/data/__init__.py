"""Data stage: the Amazon Bin Image Dataset (ABID) layout, download, index, splits, stats, synthetic bins.

A dataset directory always has the bucket's layout, whether it came from S3 or from `synth`:
``images/<id>.jpg`` and ``metadata/<id>.json``.
"""

IMAGES_DIR = "images"
METADATA_DIR = "metadata"
