"""The KV-cache policy: one enum shared by the run configuration, the wire and the generator.

Owns: `CachePolicy` (what a generator rank does with its KV cache between chunks) and the two
facts every other module derives from it: how many generator calls a chunk makes
(`implied_calls`) and whether an envelope must, may not, or cannot carry a context tensor
(`context_required`). Travels as the `cache_policy` string of every envelope, so a receiver
checks the plan it is asked to run against the policy it was shipped with, from the meta alone.
Imports nothing (config.py, protocol/ and runtime/ all import it).

| policy          | before chunk k > 0 of an epoch                    | after the chunk         | calls   |
|-----------------|---------------------------------------------------|-------------------------|---------|
| `off`           | nothing: the last denoise call's K/V stay cached  | nothing                 | n       |
| `rank0_anchor`  | rebuild from context shipped by rank0 (R0a)       | nothing                 | n + 1   |
| `latent_anchor` | rebuild from the generator's own latents (R0)     | nothing                 | n + 1   |
| `append`        | nothing                                           | one clean t = 0 call    | n + 1   |

(n = denoising steps; the first chunk of an epoch never recomputes.)
"""

from __future__ import annotations

from enum import StrEnum


class CachePolicy(StrEnum):
    OFF = "off"
    RANK0_ANCHOR = "rank0_anchor"
    LATENT_ANCHOR = "latent_anchor"
    APPEND = "append"

    @property
    def recomputes(self) -> bool:
        """Chunks after an epoch's first rebuild the cache from context frames first."""
        return self in (CachePolicy.RANK0_ANCHOR, CachePolicy.LATENT_ANCHOR)

    @property
    def ships_context(self) -> bool:
        """rank0 sends the recompute context (`context_frames_override`) with the envelope."""
        return self is CachePolicy.RANK0_ANCHOR

    @property
    def clean_calls(self) -> int:
        """Generator calls after the denoising steps (the clean t = 0 write of `append`)."""
        return 1 if self is CachePolicy.APPEND else 0


def implied_calls(num_denoise_steps: int, do_kv_recompute: bool, policy: CachePolicy) -> int:
    """Generator calls one chunk makes: the plan's count, asserted against the calls made."""
    return num_denoise_steps + (1 if do_kv_recompute else 0) + policy.clean_calls


def context_required(policy: CachePolicy, do_kv_recompute: bool) -> bool:
    """Whether the envelope carries `context_frames_override`: exactly when rank0 built it."""
    return do_kv_recompute and policy.ships_context
