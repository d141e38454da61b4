"""Shared pytest setup: deterministic, single-threaded torch so tests behave the same on 2-core CI."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
