"""The operator matrix's rows: every row of docs/test-matrix.md and the extra rows, as data.

Owns: `Row` and `ROWS` (each row mapped to the break-it tests that prove it, how many ranks
(= GPUs under nccl) it needs, whether it runs under --backend nccl, and a lower bound on its
timeout for rows of whole jobs in series). `streamdit.matrix` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Row:
    id: str
    title: str
    tests: tuple[str, ...]
    ranks: int = 2  # processes (= GPUs under nccl) the row needs
    nccl: bool = True  # runs under --backend nccl (launches real ranks)
    unavailable: str = ""  # not built yet: always a skip with this reason
    min_timeout_s: float = 0.0  # a row of whole jobs in series: its bound is at least this


TP, PP = "tests/dist/test_tp.py", "tests/dist/test_pp.py"
CH, LIVE = "tests/dist/test_channels.py", "tests/dist/test_liveness.py"
COMPILE, OUT = "tests/dist/test_compile.py", "tests/unit/test_output.py"
ROWS: tuple[Row, ...] = (
    Row(
        "OM-01",
        "unencodable meta fails in sender preflight",
        (f"{CH}::test_preflight_rows_never_send_a_header",),
        nccl=False,
    ),
    Row(
        "OM-02",
        "dtype outside the allowed set fails in preflight",
        ("tests/unit/test_messages.py", f"{CH}::test_preflight_rows_never_send_a_header[p2p]"),
        nccl=False,
    ),
    Row(
        "OM-03",
        "inconsistent plan rejected by rank0, or by the worker if forced",
        (
            f"{TP}::test_om03_inconsistent_plan_is_rejected_by_rank0_before_the_broadcast",
            f"{TP}::test_om03_inconsistent_plan_forced_past_rank0_is_rejected_by_the_worker",
        ),
    ),
    Row(
        "OM-04",
        "model / topology differs across ranks",
        (
            f"{TP}::test_rank_flag_mismatch_fails_every_rank_with_the_table[preset]",
            f"{TP}::test_rank_flag_mismatch_fails_every_rank_with_the_table[steps]",
        ),
    ),
    Row(
        "OM-05",
        "a flag gating a collective differs across ranks",
        (
            f"{TP}::test_rank_flag_mismatch_fails_every_rank_with_the_table[digest-flag]",
            f"{TP}::test_test_hook_on_one_rank_only_is_a_parity_failure",
        ),
    ),
    Row(
        "OM-06",
        "no collectives on the compute path outside the TP ones",
        ("tests/unit/test_layering.py",),
        nccl=False,
    ),
    Row(
        "OM-07",
        "PP1 leader rejects an envelope; mesh exits cleanly",
        (f"{PP}::test_om07_leader_rejects_an_envelope_and_the_mesh_exits_cleanly",),
        ranks=3,
    ),
    Row(
        "OM-08",
        "a TP collective on the world group raises before the backend",
        (
            f"{PP}::test_om08_collective_on_the_world_group_raises_before_the_backend",
            "tests/dist/test_parallel_tp.py::test_collective_on_the_wrong_group_raises_before_the_backend",
        ),
        ranks=3,
    ),
    Row(
        "OM-09",
        "a result delayed past a hard cut is dropped by cache_epoch",
        (f"{PP}::test_om09_results_in_flight_at_an_immediate_cut_are_dropped_not_decoded",),
    ),
    Row(
        "OM-10",
        "recompute without context_frames_override fails before send",
        (
            "tests/unit/test_messages.py::test_om10_recompute_without_context_and_stale_context",
            f"{CH}::test_preflight_rows_never_send_a_header[broadcast]",
        ),
        nccl=False,
    ),
    Row(
        "OM-11",
        "a perturbed broadcast input trips the input digest",
        (f"{TP}::test_om11_perturbed_input_on_a_worker_trips_the_input_digest",),
    ),
    Row(
        "OM-12",
        "a mutated weight shard trips the fingerprint check",
        (
            f"{TP}::test_om12_mutated_replicated_weight_trips_the_fingerprint_check",
            f"{TP}::test_om12_weight_mutated_mid_stream_is_caught_at_the_next_init_cache",
        ),
    ),
    Row(
        "OM-13/tp",
        "rank0 SIGKILLed (idle, mid-loop): workers exit with the orphan code",
        (
            f"{LIVE}::test_om13_rank0_killed_orphans_exit_with_code_4[tp-idle]",
            f"{LIVE}::test_om13_rank0_killed_orphans_exit_with_code_4[tp-mid-stream]",
        ),
    ),
    Row(
        "OM-13/pp",
        "rank0 SIGKILLed (idle, mid-loop): the mesh exits with the orphan code",
        (
            f"{LIVE}::test_om13_rank0_killed_orphans_exit_with_code_4[pp-idle]",
            f"{LIVE}::test_om13_rank0_killed_orphans_exit_with_code_4[pp-mid-stream]",
        ),
        ranks=3,
    ),
    Row(
        "OM-13/stop",
        "a SIGSTOPped worker is detected by rank0; the video stays valid",
        (f"{LIVE}::test_om13_stopped_worker_is_detected_by_rank0",),
        ranks=3,
    ),
    Row(
        "C-01",
        "compile on one rank only fails at startup",
        (f"{TP}::test_rank_flag_mismatch_fails_every_rank_with_the_table[compile]",),
    ),
    Row(
        "C-02",
        "a graph break around a collective fails the graph-break gate",
        (f"{COMPILE}::test_c02_graph_break_around_every_collective_fails_the_budget",),
    ),
    Row(
        "C-03",
        "a graph break on one rank only fails the compile-counter gather",
        (f"{COMPILE}::test_c03_graph_break_on_one_rank_fails_the_counter_gather",),
    ),
    Row(
        "C-03/pp",
        "C-03 under pp: rank0 (no generator) gets the mesh's verdict through the world gather",
        (f"{COMPILE}::test_c03_under_pp_rank0_learns_the_mesh_verdict",),
        ranks=3,
    ),
    Row(
        "C-04",
        "auto backend resolving differently fails at startup",
        (f"{TP}::test_c04_auto_backend_resolving_differently_fails_at_startup",),
    ),
    Row("O-01", "D=1 serializes, D=2 overlaps", (f"{PP}::test_o01_queue_depth_1_serializes_and_2_overlaps",)),
    Row(
        "O-02",
        "healthy overlap signature; a planted serialization bug is caught",
        (f"{PP}::test_o02_planted_decode_before_send_bug_shows_the_serialization_signature",),
    ),
    Row(
        "O-03",
        "recompute r0a vs off: the overlap cost measured",
        (f"{PP}::test_o03_recompute_r0a_costs_the_overlap_that_off_keeps",),
    ),
    Row(
        "X-header",
        "sender throws after the header: poisoned, peer exits (no hang)",
        (f"{CH}::test_throw_after_header_poisons_sender_and_peer_exits",),
        nccl=False,
    ),
    Row(
        "X-leader",
        "leader throws after a header, before its mesh broadcast",
        (f"{PP}::test_om07_leader_rejects_an_envelope_and_the_mesh_exits_cleanly",),
        ranks=3,
    ),
    Row(
        "X-ids",
        "stale ids, unknown version or action, absurd sizes: rejected before allocating",
        (f"{CH}::test_receiver_rejects_bad_headers_and_ids_before_allocating",),
        nccl=False,
    ),
    Row(
        "L-store-frozen",
        "rank0 SIGSTOPped with the store it hosts: every other rank exits 4 within the window",
        (f"{LIVE}::test_frozen_store_host_orphans_every_rank_within_the_window",),
        ranks=3,
    ),
    Row(
        "L-foreign-done",
        "a foreign client's done/0 key in the store: orphan detection still works",
        (f"{LIVE}::test_a_foreign_done_mark_cannot_disable_orphan_detection",),
    ),
    Row(
        "L-job-frozen",
        "the whole job stopped past the window, resumed with skew: no false verdict, exit 0",
        (f"{LIVE}::test_a_whole_job_frozen_past_the_window_resumes_without_a_false_verdict",),
    ),
    Row(
        "L-mesh-killed",
        "a pp mesh rank (leader or peer) killed: every survivor names it (exit 6)",
        (f"{LIVE}::test_pp_killed_mesh_rank_is_named_by_every_survivor",),
        ranks=3,
    ),
    Row(
        "D-verdict-mp4",
        "a watchdog abort closes the .mp4: every generated chunk in it and claimed",
        (f"{LIVE}::test_a_watchdog_abort_closes_the_mp4_with_every_chunk_generated",),
    ),
    Row(
        "D-kill",
        "SIGKILL mid-stream (.npy, .mp4): the file holds exactly what the metrics claim",
        (f"{OUT}::test_sigkill_leaves_exactly_the_claimed_frames",),
        nccl=False,
    ),
    Row(
        "D-hup",
        "SIGHUP drains like SIGTERM: exit 0, frames == metrics",
        (f"{OUT}::test_sighup_drains_like_sigterm",),
        nccl=False,
    ),
    Row(
        "D-full",
        "a full disk (.npy, .mp4): exit 1 naming it, whole file, frames == metrics",
        (
            f"{OUT}::test_a_full_disk_ends_the_run_with_every_claimed_frame_on_disk",
            f"{OUT}::test_a_full_disk_leaves_an_mp4_of_whole_fragments_equal_to_the_metrics",
        ),
        nccl=False,
    ),
    Row(
        "B-timeline",
        "hostile timelines (5000 digits, 200k-deep, not UTF-8, oversized): exit 2, no traceback",
        ("tests/unit/test_cli.py::test_hostile_timeline_exits_2_without_a_traceback",),
        nccl=False,
    ),
    Row(
        "B-out",
        "--out a directory or an unwritable folder: exit 2 before model work",
        ("tests/unit/test_cli.py::test_an_unwritable_out_exits_2_before_model_work",),
        nccl=False,
    ),
    Row(
        "L-local-abort",
        "one rank fails while its peers wait in a collective: they exit 5 naming it at once",
        (f"{LIVE}::test_a_local_failure_inside_phase_b_reaches_every_peer_at_once",),
        ranks=3,
    ),
    Row(
        "N-launcher",
        "--nproc: SIGTERM -> 0, Ctrl-C -> 130, a killed worker -> 6; no traceback",
        (
            "tests/dist/test_launcher.py::test_a_signal_to_the_launcher_drains_with_the_documented_code",
            "tests/dist/test_launcher.py::test_a_killed_worker_makes_the_job_exit_6",
        ),
        ranks=3,
    ),
    Row(
        "N-worker-term",
        "SIGTERM to a worker (hand launch, --nproc): rank0 drains the job, every rank exits 0",
        (
            "tests/dist/test_launcher.py::test_sigterm_to_a_worker_drains_the_job_under_the_launcher",
            "tests/dist/test_launcher.py::test_sigterm_to_a_hand_launched_worker_drains_every_rank",
        ),
        ranks=3,
    ),
    Row(
        "S-never-started",
        "a rank that never starts: named (exit 6) within --startup-timeout, flight record, inspect",
        (f"{LIVE}::test_a_rank_that_never_starts_is_named_within_the_startup_bound",),
    ),
    Row(
        "S-skew",
        "startup skew beyond --dist-timeout but within --startup-timeout: the job runs",
        (f"{LIVE}::test_startup_skew_is_bounded_by_the_startup_timeout_not_the_dist_timeout",),
    ),
    Row(
        "V-access",
        "serve: token, Origin, Host, JSON-only, limits, idempotent stop",
        ("tests/serve/test_serve_security.py",),
        nccl=False,
    ),
    Row(
        "V-csrf",
        "serve in Chromium: a page of another origin cannot steer the stream",
        ("tests/serve/test_serve_browser.py::test_a_page_of_another_origin_cannot_steer_the_stream",),
        nccl=False,
    ),
    Row(
        "I-records",
        "inspect: an earlier job's records ignored, rotated at start; torn / absurd records reported",
        ("tests/unit/test_inspect.py",),
        nccl=False,
    ),
    Row(
        "D-full-dist",
        "a full disk on rank0 of tp / pp: rank0 exits 1 naming it, every peer 5, never SIGABRT",
        ("tests/dist/test_chaos_jobs.py::test_a_full_disk_on_rank0_ends_every_rank_with_its_code",),
        ranks=3,
        min_timeout_s=120.0,
    ),
    Row(
        "K-chaos",
        "streamdit matrix --chaos 2 --seed 2: rank0 killed, then frozen with its store (pp)",
        (
            "tests/dist/test_chaos_jobs.py::test_two_seeded_faults_end_within_their_bounds_with_the_documented_codes",
        ),
        ranks=3,
        min_timeout_s=300.0,
    ),
    Row(
        "X-sigterm",
        "SIGTERM to rank0 mid-stream: drain, every rank exits 0, valid video",
        (f"{LIVE}::test_sigterm_to_rank0_drains_and_every_rank_exits_0",),
        ranks=3,
    ),
)
