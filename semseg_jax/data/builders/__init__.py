"""TFDS builders (ArrayRecord, no TensorFlow), one module per dataset; see ``base.py``."""
