"""SSR: Semantic and Spatial Rectification for CLIP-based weakly supervised semantic segmentation."""

__version__ = "0.1.0"
