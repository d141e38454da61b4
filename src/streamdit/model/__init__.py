"""Single-device math: causal DiT, caches, scheduler, VAE, text conditioning, weights.

Imports torch only (and streamdit.errors); never parallel/, protocol/ or runtime/.
"""
