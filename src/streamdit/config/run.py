"""`RunConfig`: the one frozen, validated object every topology is built from.

Owns: `RunConfig` and its enumerations. Each field is declared once with `setting()`
(config/settings.py): its section, flag help, parity, choices and no-effect condition; the
flags, their grouped help, the parity table and the no-effect checks are generated from that.
Must not import model/, parallel/, protocol/ (but its leaf enum module `protocol.policy`, the
cache policy shared with the wire) or runtime/. Recipe defaults come from `streamdit.recipes`
(`RunConfig.for_recipe`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from streamdit.config.checks import TEST_HOOK_PREFIX, check_run_config
from streamdit.config.settings import declared, parity_text, setting
from streamdit.protocol.policy import CachePolicy
from streamdit.recipes import RECIPES, Recipe, get_recipe

DTYPES = ("float32", "bfloat16")
# The default recipe's settings are RunConfig's defaults: one place says what "streamdit" runs.
_DEFAULT = RECIPES["streamdit"]
DEFAULT_STEP_LIST = _DEFAULT.step_list(_DEFAULT.steps)
# Video-to-video starts from the encoded input noised to the first step's sigma, so it needs
# fewer and later steps than text-to-video (StreamDiffusionV2 style).
DEFAULT_V2V_STEP_LIST = (750, 500)
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
VAE_DECODERS = ("wan", "tiny")
NORM_KERNELS = ("auto", "triton", "torch")
# the model's own tables (model/presets.py, model/attention.py) hold these; config may not import
# model/, so tests/unit/test_flags.py pins that they are equal
DIT_PRESET_NAMES = ("tiny", "wan-1.3b", "wan-14b")
ATTN_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
SERVE_ONLY = ("serve",)


def _distributed(cfg: RunConfig, command: str) -> bool:
    return cfg.topology != "single"


def _compiled(cfg: RunConfig, command: str) -> bool:
    return cfg.compile


def _with_checkpoint(cfg: RunConfig, command: str) -> bool:
    return cfg.checkpoint is not None


def _rank0_loop(cfg: RunConfig, command: str) -> bool:
    return cfg.topology != "pp"  # pp's rank0 runs Stage 0's pipelined loop, not drive()


def _profiled(cfg: RunConfig, command: str) -> bool:
    return cfg.profile is not None and _rank0_loop(cfg, command)


def _graphed(cfg: RunConfig, command: str) -> bool:
    # inductor's cudagraph modes capture graphs of their own, which must not nest in ours
    own_graphs = cfg.compile_mode in ("reduce-overhead", "max-autotune")
    return cfg.compile and cfg.topology == "single" and cfg.device.startswith("cuda") and not own_graphs


COMPILED = (_compiled, "--compile")
GRAPHED = (_graphed, "--compile on a CUDA device, --topology single and a mode without inductor's cudagraphs")
RANK0_LOOP = (_rank0_loop, "--topology single or tp (rank0's chunk loop)")
PROFILED = (_profiled, f"--profile and {RANK0_LOOP[1]}")
DISTRIBUTED = (_distributed, "--topology tp or pp (single runs one process)")


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """Everything one run needs. Fields that change which collectives run are parity keys."""

    # ---- model and weights ---------------------------------------------------------------
    preset: str = setting("tiny", section="model", parity=True, choices=DIT_PRESET_NAMES, help="DiT size")
    vae: str = setting(
        "wan",
        section="model",
        choices=VAE_DECODERS,
        help="Phase C decoder: wan (the Wan VAE) | tiny (TAEHV tiny decoder; the Wan VAE still encodes)",
    )
    """The Wan VAE's size follows --preset (small for the tiny DiT)."""
    device: str = setting("cpu", section="model", help="torch device: cpu | cuda | cuda:N")
    dtype: str = setting("float32", section="model", parity=True, choices=DTYPES, help="compute dtype")
    attn_backend: str = setting(
        "auto",
        section="model",
        parity=True,
        choices=ATTN_BACKENDS,
        help="SDPA backend (auto: cuDNN on Hopper and newer, else flash; resolved once at startup)",
    )
    norm_kernels: str = setting(
        "auto",
        section="model",
        parity=True,
        choices=NORM_KERNELS,
        help="the DiT blocks' residual + norm + modulation steps: triton (one fused kernel each, "
        "CUDA) | torch (PyTorch's / inductor's kernels) | auto (triton on CUDA where Triton is installed)",
    )
    fp8: bool = setting(
        False,
        section="model",
        parity=True,
        help="FP8 (e4m3, rowwise-scaled) linear layers in the DiT blocks (CUDA, capability >= 8.9, bfloat16)",
    )
    checkpoint: Path | None = setting(
        None,
        section="model",
        help="DiT weights: .safetensors, a sharded folder or index.json, .pt/.pth, a diffusers folder "
        "(Wan2.1, Self-Forcing, Krea or diffusers key names)",
    )
    checkpoint_select: str | None = setting(
        None,
        section="model",
        needs=(_with_checkpoint, "--checkpoint"),
        help="which state dict of a multi-model file: ema (generator_ema), a top-level key "
        "(generator, model, ...) or a key prefix ending in '.'; default: the only one / generator",
    )
    vae_checkpoint: Path | None = setting(
        None,
        section="model",
        help="VAE weights: Wan2.1_VAE.pth, .safetensors, a diffusers AutoencoderKLWan folder",
    )
    tiny_vae_checkpoint: Path | None = setting(
        None, section="model", help="TAEHV decoder weights for --vae tiny (taew2_1.pth or .safetensors)"
    )
    latent_norm: str = setting(
        "auto",
        section="model",
        choices=LATENT_NORMS,
        help="VAE latent statistics (auto: wan2.1 with a VAE checkpoint, identity otherwise)",
    )
    text_encoder: Path | None = setting(
        None,
        section="model",
        help="local umT5 folder (UMT5EncoderModel + tokenizer, or a diffusers root with text_encoder/ "
        "and tokenizer/); default: the offline hash stand-in",
    )
    text_embeddings: Path | None = setting(
        None, section="model", help="precomputed prompt embeddings (.safetensors) instead of a text encoder"
    )
    # ---- geometry ------------------------------------------------------------------------
    height: int = setting(128, section="geometry", parity=True, help="pixel height, a multiple of 16")
    width: int = setting(192, section="geometry", parity=True, help="pixel width, a multiple of 16")
    chunks: int = setting(
        4,
        section="geometry",
        needs=(
            lambda cfg, command: command != "serve",
            "run (serve generates until stopped or its input ends)",
        ),
        help="chunks to generate",
    )
    frames_per_chunk: int = setting(
        _DEFAULT.frames_per_chunk,
        section="geometry",
        parity=True,
        recipe=True,
        help="latent frames per chunk (3: 12 pixel frames in steady state)",
    )
    # ---- sampler ---------------------------------------------------------------------------
    denoising_step_list: tuple[int, ...] = setting(
        DEFAULT_STEP_LIST,
        section="sampler",
        parity=True,
        flag=None,  # --steps / --step-list (flags.py)
        recipe=True,
        help="timesteps of the few-step flow-matching sampler",
    )
    """Strictly decreasing in [0, 1000] (a 0 only as the last step)."""
    shift: float = setting(5.0, section="sampler", parity=True, help="flow schedule shift")
    seed: int = setting(
        0, section="sampler", parity=True, help="seed of weights (without a checkpoint) and noise"
    )
    # ---- recipe and KV cache ---------------------------------------------------------------
    recipe: str = setting(
        "streamdit",
        section="recipe",
        parity=True,
        choices=tuple(RECIPES),
        help="the reference loop a checkpoint runs with (cache policy, steps, window, blending, VAE rule); "
        "the flags of this group override its defaults",
    )
    recompute: str = setting(
        _DEFAULT.recompute,
        section="recipe",
        parity=True,
        recipe=True,
        choices=RECOMPUTE,
        help="KV-cache regime: off (R1) | r0a (rank0 anchor) | r0 (generator-side latent anchor) | "
        "append (a clean write after each chunk)",
    )
    """The KV-cache regime (protocol.policy.CachePolicy): off (R1, keep the last call's K/V),
    r0a (recompute before each chunk after the first; rank0 supplies the anchor from its decode:
    exact, but under pp the next envelope waits for the previous decode), r0 (generator ranks
    build the anchor from their own latents: no dependency on rank0, a different anchor), append
    (Self-Forcing: one clean t = 0 call after each chunk writes its K/V; no recompute)."""
    local_attn_frames: int = setting(
        _DEFAULT.local_attn_frames,
        section="recipe",
        parity=True,
        recipe=True,
        help="KV window in latent frames, current chunk included",
    )
    sink_frames: int = setting(
        _DEFAULT.sink_frames, section="recipe", parity=True, recipe=True, help="never-evicted first frames"
    )
    soft_bias: float = setting(
        _DEFAULT.soft_bias,
        section="recipe",
        parity=True,
        recipe=True,
        help="kv_cache_attention_bias where the recipe applies one (1.0 = none)",
    )
    blend_chunks: int = setting(
        _DEFAULT.blend_chunks,
        section="recipe",
        parity=True,
        recipe=True,
        help="chunks a soft prompt change blends over when the timeline entry does not say",
    )
    # ---- prompts and input -----------------------------------------------------------------
    prompt: str = setting(
        "a red fox running through fresh snow",
        section="input",
        needs=(
            lambda cfg, command: cfg.timeline is None,
            "no --timeline (the timeline's entries name the prompts)",
        ),
        help="the prompt (of chunk 0, when no --timeline is given)",
    )
    timeline: Path | None = setting(None, section="input", help="prompt timeline file (.toml or .json)")
    input_video: Path | None = setting(
        None, section="input", help="video-to-video input file (read with PyAV, a chunk at a time)"
    )
    # ---- output ----------------------------------------------------------------------------
    out: Path = setting(
        Path("out/streamdit.mp4"),
        section="output",
        help="output video: .mp4 (H.264) or .npy (lossless uint8 [T, H, W, 3]); serve: recorded when given",
    )
    metrics: Path | None = setting(
        None, section="output", help="JSON-lines metrics: a line per chunk, then the run's summary line"
    )
    summary: Path | None = setting(
        None,
        section="output",
        help="the run's summary as one JSON file: FPS, time to first frame, chunk period p50 / p99, "
        "startup, pp overlap (the metrics file's last line)",
    )
    profile: Path | None = setting(
        None,
        section="output",
        needs=RANK0_LOOP,
        help="a torch.profiler Chrome trace (.json) of rank0's chunks --profile-from .. +--profile-chunks "
        "(bench/profile_stream.py reads it)",
    )
    profile_from: int = setting(3, section="output", needs=PROFILED, help="first chunk profiled")
    profile_chunks: int = setting(2, section="output", needs=PROFILED, help="chunks profiled")
    fps: int = setting(
        16, section="output", help="frame rate written into the .mp4 (serve: the page's pace at first)"
    )
    progress: bool = setting(
        True,
        section="output",
        help="draw no progress on the terminal (startup stages; a run's chunk bar)",
    )
    # ---- compile ---------------------------------------------------------------------------
    compile: bool = setting(
        False,
        section="compile",
        parity=True,
        help="torch.compile the generator's blocks (one shared graph, warmed up at startup)",
    )
    compile_backend: str = setting(
        "inductor",
        section="compile",
        parity=True,
        choices=COMPILE_BACKENDS,
        needs=COMPILED,
        help="torch.compile backend (aot_eager and eager: for tests and triage)",
    )
    compile_mode: str = setting(
        "default", section="compile", parity=True, choices=COMPILE_MODES, needs=COMPILED, help="inductor mode"
    )
    graph_break_budget: int = setting(
        2,
        section="compile",
        parity=True,
        needs=COMPILED,
        help="graph breaks allowed per generator call once warmed up (more fails at startup)",
    )
    cuda_graphs: bool = setting(
        True,
        section="compile",
        needs=GRAPHED,
        help="launch every generator call and text K/V refill kernel by kernel, not as CUDA graph "
        "replays (captured at startup; they keep the device from waiting on the host)",
    )
    warmup: str = setting(
        "auto",
        section="compile",
        parity=True,
        choices=WARMUP,
        help="eager generator warm-up at startup (auto: tp / pp on CUDA; compile always warms up)",
    )
    """It runs the first-use work of the device (library handles, kernels, the TP communicator)
    under --startup-timeout, so chunk 0 is bounded by --dist-timeout like any."""
    # ---- distributed -----------------------------------------------------------------------
    topology: str = setting(
        "single",
        section="distributed",
        parity=True,
        choices=TOPOLOGIES,
        help="single | tp (rank0 runs A + C and a generator shard; workers run Phase B only) | "
        "pp (rank0 runs A + C only; ranks 1..N-1 form the generator mesh, TP inside it)",
    )
    nproc: int = setting(
        1, section="distributed", needs=DISTRIBUTED, help="local ranks streamdit starts itself (tp, pp)"
    )
    dist_timeout_s: float = setting(
        30.0,
        section="distributed",
        needs=DISTRIBUTED,
        parity=True,
        help="process-group timeout, bounding every collective",
    )
    startup_timeout_s: float = setting(
        900.0,
        section="distributed",
        needs=DISTRIBUTED,
        parity=True,
        help="bounds the wait for peers' startup work, e.g. the compile warm-up",
    )
    watchdog_window_s: float = setting(
        10.0,
        section="distributed",
        needs=DISTRIBUTED,
        parity=True,
        help="heartbeat silence that ends the job: orphan exit 4 on workers, 6 on rank0",
    )
    input_digest_every: int = setting(
        1,
        section="distributed",
        needs=DISTRIBUTED,
        parity=True,
        help="compare every rank's Phase B input digests every N chunks (0 = off)",
    )
    output_digest_every: int = setting(
        4,
        section="distributed",
        needs=DISTRIBUTED,
        parity=True,
        help="compare every rank's generator output digests every N chunks (0 = off)",
    )
    fingerprint_on_init_cache: bool = setting(
        True,
        section="distributed",
        needs=DISTRIBUTED,
        parity=True,
        help="check weight fingerprints at startup only, not again on each cache re-init",
    )
    queue_depth: int = setting(
        2,
        section="distributed",
        parity=True,
        needs=(lambda cfg, command: cfg.topology == "pp", "--topology pp (envelopes in flight to the mesh)"),
        help="pp: envelopes in flight to the mesh (D); 1 serializes the two stages",
    )
    # ---- serve -----------------------------------------------------------------------------
    host: str = setting(
        "127.0.0.1", section="serve", commands=SERVE_ONLY, help="address to listen on (rank0)"
    )
    port: int = setting(
        8000, section="serve", commands=SERVE_ONLY, help="port to listen on (0 = any free port)"
    )
    browser_input: bool = setting(
        False,
        section="serve",
        commands=SERVE_ONLY,
        help="video-to-video from the page: the viewer's webcam or a video file it picks, sent over the "
        "page's socket (mid-gray until the first frame arrives)",
    )
    start_paused: bool = setting(
        False, section="serve", commands=SERVE_ONLY, help="wait for start on the page"
    )
    # ---- not a flag ------------------------------------------------------------------------
    test_hooks: Mapping[str, str] = setting(
        factory=dict, section="distributed", flag=None, help="STREAMDIT_TEST_* settings (parity keys)"
    )
    """Named fault injection points for tests, read from the environment; the handshake compares
    them as parity keys (parity_items adds them one by one)."""

    def __post_init__(self) -> None:
        check_run_config(self)

    def eager_warmup(self, device_type: str) -> bool:
        """Whether an eager generator rank warms up at startup (see `warmup`)."""
        if self.warmup == "auto":
            return self.topology != "single" and device_type == "cuda"
        return self.warmup == "on"

    def graphs_calls(self) -> bool:
        """Whether the generator's calls replay CUDA graphs (see `cuda_graphs`)."""
        return self.cuda_graphs and _graphed(self, "run")

    @classmethod
    def for_recipe(cls, recipe: str, **settings: object) -> RunConfig:
        """A config with the recipe's run defaults, then `settings` (explicit flags) on top.
        Video-to-video under the streamdit recipe defaults to its own, shorter step list."""
        defaults = get_recipe(recipe).run_defaults()
        if recipe == "streamdit" and (settings.get("input_video") or settings.get("browser_input")):
            defaults["denoising_step_list"] = DEFAULT_V2V_STEP_LIST
        return cls(**{**defaults, **settings})  # type: ignore[arg-type]

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
        """Every setting declared a parity key, as text (compared on all ranks at startup), then
        the test hooks."""
        items = {d.name: parity_text(getattr(self, d.name)) for d in declared(RunConfig) if d.setting.parity}
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
