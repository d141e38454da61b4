"""Run configuration: the one frozen, validated object every topology is built from.

Owns: `RunConfig` (built once from CLI flags), the launch environment (`LaunchEnv`), the
test-hook settings (`STREAMDIT_TEST_*`), and the list of parity keys. This is the ONLY module
that reads `os.environ`. Must not import model/, parallel/, protocol/ (but its leaf enum module
`protocol.policy`, the cache policy shared with the wire) or runtime/. Recipe defaults come from
`streamdit.recipes` (`RunConfig.for_recipe`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from streamdit.errors import ConfigError
from streamdit.protocol.policy import CachePolicy
from streamdit.recipes import RECIPES, Recipe, get_recipe

DTYPES = ("float32", "bfloat16")
# The default recipe's settings are RunConfig's defaults: one place says what "streamdit" runs.
_DEFAULT = RECIPES["streamdit"]
DEFAULT_STEP_LIST = _DEFAULT.step_list(_DEFAULT.steps)
# Video-to-video starts from the encoded input noised to the first step's sigma, so it needs
# fewer and later steps than text-to-video (StreamDiffusionV2 style).
DEFAULT_V2V_STEP_LIST = (750, 500)
OUTPUT_SUFFIXES = (".mp4", ".npy")
TOPOLOGIES = ("single", "tp", "pp")
RECOMPUTE = ("off", "r0a", "r0", "append")
CACHE_POLICY = {
    "off": CachePolicy.OFF,
    "r0a": CachePolicy.RANK0_ANCHOR,
    "r0": CachePolicy.LATENT_ANCHOR,
    "append": CachePolicy.APPEND,
}
LATENT_NORMS = ("auto", "identity", "wan2.1")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
WARMUP = ("auto", "on", "off")
TEST_HOOK_PREFIX = "STREAMDIT_TEST_"


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """Everything one run needs. Fields that change which collectives run are parity keys."""

    recipe: str = "streamdit"
    """The loop a checkpoint runs with (recipes.py): streamdit | self-forcing | krea-realtime |
    scope-krea. `for_recipe` fills the settings it defaults; the rest are its fixed rules."""
    topology: str = "single"
    """single | tp (rank0 runs A + C and a generator shard; workers run Phase B only) | pp (rank0
    runs A + C only; ranks 1..N-1 form the generator mesh, TP inside it when N-1 > 1)."""
    nproc: int = 1
    """Local ranks `streamdit run` starts itself (runtime/launch.py) for tp / pp."""
    dist_timeout_s: float = 30.0
    """Process-group timeout: bounds every blocking collective (bring-up and per chunk)."""
    startup_timeout_s: float = 900.0
    """Bounds the wait for peers' long startup work (the compile warm-up of a large preset: under
    pp, rank0 waits for the whole mesh warm-up); the compile-health gather runs under it."""
    watchdog_window_s: float = 10.0
    """tp / pp: a peer silent this long on the heartbeat store ends the job (orphan exit 4 on
    workers, 6 on rank0)."""
    input_digest_every: int = 1
    """Compare digests of every rank's Phase B inputs every N chunks (0 = off)."""
    output_digest_every: int = 4
    """Compare digests of every rank's generator output every N chunks (0 = off)."""
    fingerprint_on_init_cache: bool = True
    """Re-check weight fingerprints (OM-12) on every later chunk that re-initializes the cache."""
    preset: str = "tiny"
    """DiT preset: tiny | wan-1.3b | wan-14b."""
    vae: str = "wan"
    """Phase C's decoder: wan (the Wan VAE's own decoder) | tiny (the TAEHV tiny decoder for Wan
    latents, several times faster; the Wan VAE still encodes). The Wan VAE's size follows
    --preset (small for the tiny DiT)."""
    height: int = 128
    """Pixel height, a multiple of 16."""
    width: int = 192
    """Pixel width, a multiple of 16."""
    chunks: int = 4
    """Number of chunks to generate."""
    frames_per_chunk: int = _DEFAULT.frames_per_chunk
    """Latent frames per chunk (3 → 12 pixel frames in steady state)."""
    denoising_step_list: tuple[int, ...] = DEFAULT_STEP_LIST
    """Timesteps of the few-step flow-matching sampler, strictly decreasing in [0, 1000] (a 0
    only as the last step)."""
    shift: float = 5.0
    """Flow schedule shift."""
    seed: int = 0
    """Seed of weights (unless a checkpoint is given) and of every noise tensor."""
    prompt: str = "a red fox running through fresh snow"
    """Prompt of chunk 0 when no timeline is given."""
    timeline: Path | None = None
    """Prompt timeline file (TOML or JSON)."""
    input_video: Path | None = None
    """Input video for video-to-video (read with PyAV)."""
    out: Path = Path("out/streamdit.mp4")
    """Output video: .mp4 (PyAV) or .npy (lossless uint8 [T, H, W, 3])."""
    metrics: Path | None = None
    """JSON-lines metrics file, one line per chunk."""
    device: str = "cpu"
    """Torch device: cpu, cuda, cuda:N."""
    dtype: str = "float32"
    """float32 | bfloat16."""
    attn_backend: str = "auto"
    """SDPA backend: auto | flash | efficient | cudnn | math (auto resolves once at startup)."""
    fp8: bool = False
    """FP8 (e4m3, rowwise-scaled) linear layers in the DiT blocks: CUDA, compute capability >= 8.9,
    bfloat16 only."""
    compile: bool = False
    """torch.compile the generator's blocks (one shared graph; cache bookkeeping stays eager)."""
    compile_backend: str = "inductor"
    """torch.compile backend: inductor | aot_eager | eager (the last two for tests and triage)."""
    compile_mode: str = "default"
    """inductor mode: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs."""
    graph_break_budget: int = 2
    """Graph breaks allowed per generator call once warmed up (C-02); more fails at startup."""
    warmup: str = "auto"
    """Eager generator warm-up at startup (compile always warms up): on | off | auto (on for tp
    and pp on CUDA). It runs the first-use work of the device (library handles, kernels, the TP
    communicator) under --startup-timeout, so chunk 0 is bounded by --dist-timeout like any."""
    recompute: str = _DEFAULT.recompute
    """The KV-cache regime (protocol.policy.CachePolicy): off (R1, keep the last call's K/V),
    r0a (recompute before each chunk after the first; rank0 supplies the anchor from its decode:
    exact, but under pp the next envelope waits for the previous decode), r0 (generator ranks
    build the anchor from their own latents: no dependency on rank0, a different anchor), append
    (Self-Forcing: one clean t = 0 call after each chunk writes its K/V; no recompute)."""
    queue_depth: int = 2
    """pp: envelopes in flight to the mesh (D); 1 serializes the two stages."""
    local_attn_frames: int = _DEFAULT.local_attn_frames
    """KV window in latent frames, current chunk included."""
    sink_frames: int = _DEFAULT.sink_frames
    """Frames at the stream start that are never evicted."""
    soft_bias: float = _DEFAULT.soft_bias
    """kv_cache_attention_bias where the recipe applies one (1.0 = none)."""
    blend_chunks: int = _DEFAULT.blend_chunks
    """Chunks a soft prompt change blends over when the timeline entry does not say."""
    checkpoint: Path | None = None
    """DiT weights: .safetensors (single, or a sharded folder / index.json), .pt / .pth
    (weights only), or a diffusers folder; Wan2.1, Self-Forcing, Krea or diffusers key names."""
    checkpoint_select: str | None = None
    """Which state dict of a multi-model checkpoint: ema (generator_ema), a top-level key
    (generator, model, ...) or a key prefix ending in '.'; default: the only one / generator."""
    vae_checkpoint: Path | None = None
    """VAE weights: Wan2.1_VAE.pth, .safetensors or a diffusers AutoencoderKLWan folder."""
    tiny_vae_checkpoint: Path | None = None
    """TAEHV decoder weights for --vae tiny (taew2_1.pth or .safetensors); default: seeded."""
    latent_norm: str = "auto"
    """VAE latent statistics: auto (wan2.1 with real VAE weights, identity with synthetic
    ones) | identity | wan2.1."""
    text_encoder: Path | None = None
    """A local umT5 folder (transformers' UMT5EncoderModel + tokenizer, or a diffusers root
    with text_encoder/ and tokenizer/); default: the offline hash stand-in."""
    text_embeddings: Path | None = None
    """Precomputed prompt embeddings (.safetensors) instead of a text encoder."""
    fps: int = 16
    """Frame rate written into the .mp4."""
    progress: bool = True
    """Show a progress bar when stderr is a terminal."""
    test_hooks: Mapping[str, str] = field(default_factory=dict)
    """STREAMDIT_TEST_* settings (parity keys): named fault injection points for tests."""

    def __post_init__(self) -> None:
        _check(self.recipe in RECIPES, "recipe", f"{self.recipe!r} is not one of {tuple(RECIPES)}")
        _check(
            self.text_encoder is None or self.text_embeddings is None,
            "text_encoder",
            "give --text-encoder or --text-embeddings, not both",
        )
        _check(
            self.latent_norm in LATENT_NORMS,
            "latent_norm",
            f"{self.latent_norm!r} is not one of {LATENT_NORMS}",
        )
        _check(self.vae in VAE_DECODERS, "vae", f"{self.vae!r} is not one of {VAE_DECODERS}")
        _check(
            self.tiny_vae_checkpoint is None or self.vae == "tiny",
            "tiny_vae_checkpoint",
            "--tiny-vae-checkpoint has no effect without --vae tiny",
        )
        _check(self.blend_chunks >= 1, "blend_chunks", f"must be >= 1, got {self.blend_chunks}")
        _check(
            self.compile_backend in COMPILE_BACKENDS,
            "compile_backend",
            f"{self.compile_backend!r} is not one of {COMPILE_BACKENDS}",
        )
        _check(
            self.compile_mode in COMPILE_MODES,
            "compile_mode",
            f"{self.compile_mode!r} is not one of {COMPILE_MODES}",
        )
        _check(
            self.compile_mode == "default" or self.compile_backend == "inductor",
            "compile_mode",
            f"{self.compile_mode!r} needs compile_backend inductor, got {self.compile_backend!r}",
        )
        _check(self.warmup in WARMUP, "warmup", f"{self.warmup!r} is not one of {WARMUP}")
        _check(
            self.graph_break_budget >= 0, "graph_break_budget", f"must be >= 0, got {self.graph_break_budget}"
        )
        _check(self.topology in TOPOLOGIES, "topology", f"{self.topology!r} is not one of {TOPOLOGIES}")
        _check(self.nproc >= 1, "nproc", f"must be >= 1, got {self.nproc}")
        _check(self.startup_timeout_s > 0, "startup_timeout_s", f"must be > 0, got {self.startup_timeout_s}")
        _check(self.dist_timeout_s > 0, "dist_timeout_s", f"must be > 0, got {self.dist_timeout_s}")
        _check(self.watchdog_window_s > 0, "watchdog_window_s", f"must be > 0, got {self.watchdog_window_s}")
        _check(self.input_digest_every >= 0, "input_digest_every", "must be >= 0")
        _check(self.output_digest_every >= 0, "output_digest_every", "must be >= 0")
        _check(
            self.height > 0 and self.height % 16 == 0,
            "height",
            f"{self.height} is not a positive multiple of 16",
        )
        _check(
            self.width > 0 and self.width % 16 == 0,
            "width",
            f"{self.width} is not a positive multiple of 16",
        )
        _check(self.chunks >= 1, "chunks", f"must be >= 1, got {self.chunks}")
        _check(
            self.frames_per_chunk >= 1,
            "frames_per_chunk",
            f"must be >= 1, got {self.frames_per_chunk}",
        )
        steps = self.denoising_step_list
        _check(len(steps) >= 1, "denoising_step_list", "must not be empty")
        _check(
            all(0 <= t <= 1000 for t in steps) and 0 not in steps[:-1],
            "denoising_step_list",
            f"{steps} must lie in [0, 1000] (a 0 only as the last step)",
        )
        _check(
            all(a > b for a, b in zip(steps, steps[1:], strict=False)),
            "denoising_step_list",
            f"{steps} must be strictly decreasing",
        )
        _check(self.recompute in RECOMPUTE, "recompute", f"{self.recompute!r} is not one of {RECOMPUTE}")
        _check(self.queue_depth >= 1, "queue_depth", f"must be >= 1, got {self.queue_depth}")
        _check(self.dtype in DTYPES, "dtype", f"{self.dtype!r} is not one of {DTYPES}")
        _check(
            self.out.suffix in OUTPUT_SUFFIXES,
            "out",
            f"{self.out} must end in one of {OUTPUT_SUFFIXES}",
        )
        _check(0.0 < self.soft_bias <= 1.0, "soft_bias", f"must be in (0, 1], got {self.soft_bias}")
        _check(self.shift > 0, "shift", f"must be > 0, got {self.shift}")
        _check(self.fps >= 1, "fps", f"must be >= 1, got {self.fps}")
        ctx = self.context_frames
        _check(
            self.local_attn_frames >= self.frames_per_chunk + (ctx if self.cache_policy.recomputes else 0),
            "local_attn_frames",
            f"{self.local_attn_frames} cannot hold the context ({ctx}) "
            f"plus a chunk ({self.frames_per_chunk})",
        )
        _check(
            self.sink_frames >= 0 and self.sink_frames + self.frames_per_chunk < self.local_attn_frames,
            "sink_frames",
            f"{self.sink_frames} leaves no evictable frame in a window of {self.local_attn_frames}",
        )
        for key in self.test_hooks:
            _check(
                key.startswith(TEST_HOOK_PREFIX),
                "test_hooks",
                f"{key} lacks the {TEST_HOOK_PREFIX} prefix",
            )

    def eager_warmup(self, device_type: str) -> bool:
        """Whether an eager generator rank warms up at startup (see `warmup`)."""
        if self.warmup == "auto":
            return self.topology != "single" and device_type == "cuda"
        return self.warmup == "on"

    @classmethod
    def for_recipe(cls, recipe: str, **settings: object) -> RunConfig:
        """A config with the recipe's run defaults, then `settings` (explicit flags) on top."""
        return cls(**{**get_recipe(recipe).run_defaults(), **settings})  # type: ignore[arg-type]

    @property
    def recipe_spec(self) -> Recipe:
        return RECIPES[self.recipe]

    @property
    def cache_policy(self) -> CachePolicy:
        return CACHE_POLICY[self.recompute]

    @property
    def window_fill_chunks(self) -> int:
        """Chunks from a cache init until the KV window is full and evicting, plus one: the
        steady state every later chunk runs in (warm-up and Stage 0 rehearsal run this far)."""
        return math.ceil(self.local_attn_frames / self.frames_per_chunk) + 2

    @property
    def context_frames(self) -> int:
        """Clean latent frames re-encoded by a recompute call: one anchor plus the most recent."""
        return self.frames_per_chunk

    @property
    def vae_preset(self) -> str:
        """The Wan VAE's size: the small one for the tiny DiT, Wan2.1's widths otherwise."""
        return "tiny" if self.preset == "tiny" else "wan"

    def parity_items(self) -> dict[str, str]:
        """Every setting that must be equal on all ranks, as strings (compared at startup)."""
        items = {
            "recipe": self.recipe,
            "topology": self.topology,
            "dist_timeout_s": repr(self.dist_timeout_s),
            "startup_timeout_s": repr(self.startup_timeout_s),
            "input_digest_every": str(self.input_digest_every),
            "output_digest_every": str(self.output_digest_every),
            "watchdog_window_s": str(self.watchdog_window_s),
            "fingerprint_on_init_cache": str(self.fingerprint_on_init_cache),
            "seed": str(self.seed),
            "preset": self.preset,
            "height": str(self.height),
            "width": str(self.width),
            "frames_per_chunk": str(self.frames_per_chunk),
            "denoising_step_list": ",".join(map(str, self.denoising_step_list)),
            "shift": repr(self.shift),
            "dtype": self.dtype,
            "attn_backend": self.attn_backend,
            "fp8": str(self.fp8),
            "compile": str(self.compile),
            "compile_backend": self.compile_backend,
            "compile_mode": self.compile_mode,
            "graph_break_budget": str(self.graph_break_budget),
            "warmup": self.warmup,
            "recompute": self.recompute,
            "queue_depth": str(self.queue_depth),
            "local_attn_frames": str(self.local_attn_frames),
            "sink_frames": str(self.sink_frames),
            "soft_bias": repr(self.soft_bias),
            "blend_chunks": str(self.blend_chunks),
        }
        items.update({k: v for k, v in sorted(self.test_hooks.items())})
        return items

    def synthetic_note(self) -> str | None:
        """One line naming every part that runs on stand-ins (None when all are real)."""
        parts = []
        if self.checkpoint is None:
            parts.append("seeded synthetic DiT weights")
        if self.vae_checkpoint is None:
            parts.append("seeded synthetic VAE weights")
        if self.vae == "tiny" and self.tiny_vae_checkpoint is None:
            parts.append("seeded synthetic tiny-decoder weights")
        if self.text_encoder is None and self.text_embeddings is None:
            parts.append("the hash text encoder")
        if not parts:
            return None
        listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return (
            f"NOTE: this run uses {listed}, not a real model: its video shows no real content "
            "(README: 'Run a real model')"
        )

    def config_hash(self) -> str:
        blob = json.dumps(self.parity_items(), sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=8).hexdigest()

    def replace(self, **changes: object) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def hook(self, name: str, default: str | None = None) -> str | None:
        """Value of the test hook STREAMDIT_TEST_<NAME>, or default."""
        return self.test_hooks.get(TEST_HOOK_PREFIX + name, default)


VAE_DECODERS = ("wan", "tiny")


def _check(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"invalid {name}: {why} [field={name}]")


def read_test_hooks(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The STREAMDIT_TEST_* settings of this process (they become parity keys)."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if k.startswith(TEST_HOOK_PREFIX)}


@dataclass(frozen=True, kw_only=True, slots=True)
class LaunchEnv:
    """The torchrun-compatible launch environment of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launched: bool = False
    """True when a launcher (torchrun, `--nproc`, SLURM by hand) set RANK for this process."""
    agent_store: bool = False
    """True when the launcher's agent hosts the rendezvous store (torch elastic), not rank0."""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> LaunchEnv:
        env = os.environ if environ is None else environ
        try:
            return cls(
                rank=int(env.get("RANK", "0")),
                world_size=int(env.get("WORLD_SIZE", "1")),
                local_rank=int(env.get("LOCAL_RANK", "0")),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(env.get("MASTER_PORT", "29500")),
                launched="RANK" in env,
                agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
            )
        except ValueError as exc:
            raise ConfigError(f"malformed launch environment: {exc} [field=RANK/WORLD_SIZE]") from exc


def nccl_environment_defaults() -> dict[str, str]:
    """NCCL / PyTorch settings every streamdit process runs with.

    NVLink multicast (NVLS) stays off: on shared hosts it can take GPUs out of service. Async
    error handling turns a failed NCCL collective into an exception instead of a hang. After a
    collective times out, PyTorch's NCCL watchdog waits for a debug dump before it takes the
    process down: 60 s by default (measured on torch 2.11: timeout + 60 s), 1 s here (measured:
    timeout + 3.5 s), so `--dist-timeout` is the bound an operator sees.
    """
    return {
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC": "1000",
    }


def cuda_loading_defaults(topology: str) -> dict[str, str]:
    """CUDA_MODULE_LOADING=EAGER under pp, unless the user set it (applied before CUDA starts).

    pp's rank0 keeps NCCL kernels pending on its comm threads' streams (the recv of the next
    result, an envelope the leader has not taken yet) while its main thread runs Stage 0. With
    lazy loading, the first launch of a kernel whose module is not loaded yet loads it under
    the CUDA context lock and waits for the device's running kernels, the pending NCCL ones
    included; those wait for a send the comm thread cannot launch past that lock: a hang until
    the NCCL timeout (seen on NCCL with 2 ranks). Eager loading does all module loads at CUDA
    start-up, before any NCCL kernel exists. tp and single run one thread per rank: no cycle.
    """
    if topology != "pp" or "CUDA_MODULE_LOADING" in os.environ:
        return {}
    return {"CUDA_MODULE_LOADING": "EAGER"}


def loopback_socket_defaults() -> dict[str, str]:
    """gloo's and NCCL's sockets on loopback for a one-host job (MASTER_ADDR is loopback),
    unless the user chose interfaces: nothing of a local job listens on other interfaces."""
    return {k: "lo" for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if k not in os.environ}


def cpu_thread_defaults(nproc: int) -> dict[str, str]:
    """OMP_NUM_THREADS for `nproc` local ranks (as torchrun does), unless the user set it.

    Ranks run concurrently under pp (Stage 0 decodes while the mesh denoises): with every
    process spinning OpenMP threads on every core, each phase slows down several times.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, nproc)))}


def rank_environment(
    rank: int, world_size: int, master_port: int, *, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The torchrun environment of local rank `rank` of `world_size` (rank0 hosts the store on
    loopback at `master_port`), over `base` (default: this process's own, test hooks included:
    ranks of one job must agree on them), with the NCCL and CPU-thread defaults."""
    env = dict(os.environ if base is None else base)
    env.update(nccl_environment_defaults())
    env.update(cpu_thread_defaults(world_size))
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(master_port),
    )
    return env


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment for a child process, minus test hooks, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(TEST_HOOK_PREFIX)}
    env.update(extra)
    return env


def apply_environment(values: Mapping[str, str]) -> list[str]:
    """Set process environment variables (inherited by ranks we start); warn on overwrite.

    The one place streamdit writes os.environ. Returns the names that changed.
    """
    changed = []
    for key, value in values.items():
        old = os.environ.get(key)
        if old == value:
            continue
        if old is not None:
            logging.getLogger(__name__).warning("overriding %s=%s with %s", key, old, value)
        os.environ[key] = value
        changed.append(key)
    return changed


def is_tty_allowed(environ: Mapping[str, str] | None = None) -> bool:
    """False when the environment asks for no terminal decorations (CI, NO_COLOR-style)."""
    env = os.environ if environ is None else environ
    return env.get("CI", "").lower() not in ("1", "true") and "STREAMDIT_NO_PROGRESS" not in env
