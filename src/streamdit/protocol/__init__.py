"""Wire protocol: messages, codec, preflight, channels. Imports torch only; no model, no runtime."""
