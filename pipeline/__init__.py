"""rmt-pipeline: train the RMT vision backbone on ImageNet-1K with DeepSpeed ZeRO."""

__version__ = "0.1.0"
