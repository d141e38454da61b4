"""streamdit: chunk-by-chunk causal video diffusion that crashes fast instead of hanging."""

__version__ = "0.1.0"
