"""Run configuration: what one run is (`RunConfig`) and what its process was given (environment).

Modules: `settings` (how a setting is declared: section, help, parity, flag, choices; the flags
and the parity table are generated from the declarations), `run` (`RunConfig`, its enumerations
and its checks), `environment` (the ONLY reader of `os.environ`: launch environment, test
hooks, NCCL / CUDA / thread defaults, child environments). Everything is re-exported here:
callers import `streamdit.config`. Imports errors, recipes and `protocol.policy` only.
"""

from streamdit.config.checks import OUTPUT_SUFFIXES, TEST_HOOK_PREFIX
from streamdit.config.environment import (
    LaunchEnv,
    apply_environment,
    child_environment,
    cpu_thread_defaults,
    cuda_loading_defaults,
    is_tty_allowed,
    loopback_socket_defaults,
    nccl_environment_defaults,
    rank_environment,
    read_test_hooks,
)
from streamdit.config.run import (
    ATTN_BACKENDS,
    CACHE_POLICY,
    COMPILE_BACKENDS,
    COMPILE_MODES,
    DEFAULT_STEP_LIST,
    DEFAULT_V2V_STEP_LIST,
    DIT_PRESET_NAMES,
    DTYPES,
    LATENT_NORMS,
    NORM_KERNELS,
    RECOMPUTE,
    TOPOLOGIES,
    VAE_DECODERS,
    WARMUP,
    RunConfig,
)
from streamdit.config.settings import SECTIONS, Declared, Setting, declared

__all__ = [
    "ATTN_BACKENDS",
    "CACHE_POLICY",
    "COMPILE_BACKENDS",
    "COMPILE_MODES",
    "DEFAULT_STEP_LIST",
    "DEFAULT_V2V_STEP_LIST",
    "DIT_PRESET_NAMES",
    "DTYPES",
    "LATENT_NORMS",
    "NORM_KERNELS",
    "OUTPUT_SUFFIXES",
    "RECOMPUTE",
    "SECTIONS",
    "TEST_HOOK_PREFIX",
    "TOPOLOGIES",
    "VAE_DECODERS",
    "WARMUP",
    "Declared",
    "LaunchEnv",
    "RunConfig",
    "Setting",
    "apply_environment",
    "child_environment",
    "cpu_thread_defaults",
    "cuda_loading_defaults",
    "declared",
    "is_tty_allowed",
    "loopback_socket_defaults",
    "nccl_environment_defaults",
    "rank_environment",
    "read_test_hooks",
]
