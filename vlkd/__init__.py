"""vlkd: image URLs with captions in, a CLIP-distilled generative vision-language model out."""

__version__ = "0.1.0"
