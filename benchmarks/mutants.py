"""Mutation testing: do the tests fail when the code is wrong? (issue 21)

Each mutant below is one realistic one-line bug: a file, the exact text it replaces (which must occur there once),
the new text, and the tests that should catch it. The harness copies the working tree to a temporary folder, runs
every mutant's tests there once unmutated (they must pass, or a "kill" would mean nothing), then, one mutant at a
time, writes the mutated file, runs its tests (pytest -x, with a timeout) and puts the file back. A mutant is killed
when its tests fail or time out, and survives when they pass. It prints a table and the score and writes both to
benchmarks/results/mutants.txt.

    python benchmarks/mutants.py                 # every mutant, about 7 minutes on 2 CPU cores
    python benchmarks/mutants.py --only top-p    # the mutants whose names contain any of these words
    python benchmarks/mutants.py --list          # the mutants and their tests, without running anything

Run on demand, not in CI (it runs pytest once per mutant). A survivor is a test to write, or a mutant that changes
no observable behaviour (an equivalent mutant): say which in README.md's Test section.
"""
import argparse
import dataclasses
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "mutants.txt")
# Not copied: version control, environments, caches, run folders
IGNORED = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", ".pytest_cache", "out", "*.pyc")


@dataclasses.dataclass
class Mutant:
    """One bug: in `file`, `old` (found exactly once) becomes `new`; `tests` are pytest's arguments."""
    name: str
    file: str
    old: str
    new: str
    tests: list


ORACLES = "tests/test_oracles.py"
PARITY = "tests/test_parity.py"
KERNELS = "tests/test_kernels.py"
ATTENTION = f"{ORACLES}::test_every_attention_path_with_a_cache_and_with_packing_matches_float64"
GENERATION = f"{ORACLES}::test_generation_with_a_cache_matches_generation_without_on_every_path"
PACKED_LOSS = f"{ORACLES}::test_a_packed_loss_is_the_sum_of_its_samples_losses_alone"
LOSS = f"{ORACLES}::test_training_loss_is_cross_entropy_of_each_position_predicting_the_next_label"
LR = f"{ORACLES}::test_learning_rate_of_every_step_against_hand_computed_values"
RUN_LR = "tests/test_train.py::test_every_step_of_a_short_run_uses_the_learning_rate_computed_by_hand"
TOP_P = f"{ORACLES}::test_top_p_drops_tokens_whose_total_is_exactly_one_minus_top_p"
DISTRIBUTION = f"{ORACLES}::test_sampling_draws_from_the_documented_distribution"
VIZ = f"{ORACLES}::test_viz_draws_the_tile_grid_without_the_newline_column"
LOGITS = f"{PARITY}::test_logits_and_features_match_reference"
PICKERS = "tests/test_text.py::test_token_pickers"
KERNEL_LENGTHS = f"{KERNELS}::test_query_length_differs_from_key_length"
KERNEL_DTYPES = f"{KERNELS}::test_head_dims_dtypes_causal"

MUTANTS = [
    # ---- interleave.py: RMSNorm and rotary (§1)
    Mutant("rmsnorm-weight-before-cast", "interleave.py",
           "return self.weight * x32.to(x.dtype)", "return (self.weight * x32).to(x.dtype)",
           [f"{ORACLES}::test_rmsnorm_in_bf16_rounds_before_the_weight_as_documented"]),
    Mutant("rmsnorm-one-plus-weight", "interleave.py",
           "return self.weight * x32.to(x.dtype)", "return (1 + self.weight) * x32.to(x.dtype)", [LOGITS]),
    Mutant("rmsnorm-sum-not-mean", "interleave.py",
           "x32.pow(2).mean(-1, keepdim=True)", "x32.pow(2).sum(-1, keepdim=True)", [LOGITS]),
    Mutant("rotary-rotate-half-sign", "interleave.py",
           "torch.cat([-x2, x1], dim=-1)", "torch.cat([x2, -x1], dim=-1)", [LOGITS]),
    Mutant("rotary-positions-in-bf16", "interleave.py",
           "angles = positions.float()[..., None] * inv_freq",
           "angles = positions.to(dtype)[..., None] * inv_freq",
           [f"{ORACLES}::test_rotary_tables_in_bf16_keep_positions_past_256_exact"]),
    # ---- interleave.py: attention
    Mutant("causal-mask-offset-with-cache", "interleave.py",
           ".tril(tk - tq)", ".tril(tq - tk)", [ATTENTION, GENERATION]),
    Mutant("packing-mask-dropped", "interleave.py",
           "visible = same if visible is None else visible & same",
           "visible = same if visible is None else visible", [ATTENTION, PACKED_LOSS]),
    Mutant("sdpa-top-left-causal-with-cache", "interleave.py",
           "simple = cu_seqlens is None and (tq == tk or tq == 1)", "simple = cu_seqlens is None", [ATTENTION]),
    Mutant("triton-batch-key-offsets", "interleave.py",
           "cu_k = torch.arange(0, (b + 1) * tk, tk,", "cu_k = torch.arange(0, (b + 1) * tq, tq,", [ATTENTION]),
    Mutant("plain-gqa-head-mapping", "interleave.py",
           "k = k.repeat_interleave(group, dim=1)", "k = k.repeat(1, group, 1, 1)", [ATTENTION]),
    Mutant("plain-scale-divides", "interleave.py",
           "scores = (q.float() @ k.float().transpose(-1, -2)) * scale",
           "scores = (q.float() @ k.float().transpose(-1, -2)) / scale", [ATTENTION]),
    Mutant("fixed-step-query-misses-itself", "interleave.py",
           "visible = torch.arange(k.shape[2], device=k.device) <= start",
           "visible = torch.arange(k.shape[2], device=k.device) < start",
           [f"{PARITY}::test_fixed_shape_decode_step_matches_the_dynamic_one"]),
    # ---- interleave.py: the cache and generation
    Mutant("decode-position-off-by-one", "interleave.py",
           "at = torch.full((1,), t + step, device=token.device)",
           "at = torch.full((1,), t + step + 1, device=token.device)", [GENERATION]),
    Mutant("kv-cache-returns-new-keys-only", "interleave.py",
           "return self.k[layer, :, :, :end], self.v[layer, :, :, :end]",
           "return self.k[layer, :, :, start:end], self.v[layer, :, :, start:end]", [GENERATION]),
    # ---- interleave.py: sampling (§3)
    Mutant("top-p-keeps-the-exact-boundary", "interleave.py",
           "drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p",
           "drop = sorted_logits.softmax(-1).cumsum(-1) < 1 - top_p", [TOP_P]),
    Mutant("top-p-protects-the-least-likely", "interleave.py",
           "drop[:, -1] = False", "drop[:, 0] = False", [TOP_P, PICKERS]),
    Mutant("top-k-drops-ties", "interleave.py",
           "logits.masked_fill(logits < kth,", "logits.masked_fill(logits <= kth,",
           [f"{ORACLES}::test_top_k_keeps_ties_with_the_kth_logit"]),
    Mutant("temperature-multiplies", "interleave.py",
           "logits = logits / temperature", "logits = logits * temperature", [DISTRIBUTION]),
    Mutant("penalty-multiplies-positive-logits", "interleave.py",
           "logits / repetition_penalty,", "logits * repetition_penalty,", [DISTRIBUTION, PICKERS]),
    Mutant("penalty-lands-on-token-0-for-image-slots", "interleave.py",
           "ids = sequence.masked_fill(sequence == image_token_id, vocab)",
           "ids = sequence.masked_fill(sequence == image_token_id, 0)", [DISTRIBUTION]),
    # ---- interleave.py: multi-patch and packing (§4, §5)
    Mutant("tiles-merged-column-major", "interleave.py",
           "grid = tiles.permute(4, 0, 2, 1, 3)", "grid = tiles.permute(4, 0, 3, 1, 2)",
           ["tests/test_scenarios.py::test_multipatch_matches_reference_or_the_original_rule"]),
    Mutant("canvas-tie-goes-to-the-last", "interleave.py",
           "waste < best_waste", "waste <= best_waste",
           ["tests/test_scenarios.py::test_multipatch_token_counts",
            "tests/test_scenarios.py::test_multipatch_counts_follow_the_original_rule_everywhere"]),
    Mutant("pack-keeps-each-first-label", "interleave.py",
           "sample_labels[:1] = IGNORE", "sample_labels[:0] = IGNORE", [PACKED_LOSS]),
    Mutant("pack-positions-run-on", "interleave.py",
           "position_ids=torch.cat([torch.arange(n) for n in lengths]),",
           "position_ids=torch.arange(sum(lengths)),", [PACKED_LOSS]),
    # ---- kernels.py: the Triton flash attention
    Mutant("kernel-causal-diagonal", "kernels.py",
           "see = see & (offs_n[None, :] <= offs_m[:, None] + shift)",
           "see = see & (offs_n[None, :] < offs_m[:, None] + shift)", [KERNEL_LENGTHS]),
    Mutant("kernel-unmasked-range-too-long", "kernels.py",
           "full = tl.minimum(Lk, m0 + 1 + Lk - Lq)", "full = tl.minimum(Lk, m0 + BLOCK_M + Lk - Lq)",
           [KERNEL_LENGTHS]),
    Mutant("kernel-denominator-not-rescaled", "kernels.py",
           "l_i = l_i * alpha + tl.sum(p, 1)", "l_i = l_i + tl.sum(p, 1)", [KERNEL_DTYPES]),
    Mutant("kernel-gqa-head-mapping", "kernels.py",
           "uncopied.\n    kv_head = head // (n_heads // n_kv_heads)", "uncopied.\n    kv_head = head % n_kv_heads",
           [f"{KERNELS}::test_gqa_ratios"]),
    Mutant("kernel-backward-diagonal", "kernels.py",
           "pT = tl.where(offs_n[:, None] <= offs_m[None, :] + shift, pT, 0.0)",
           "pT = tl.where(offs_n[:, None] < offs_m[None, :] + shift, pT, 0.0)", [KERNEL_LENGTHS]),
    Mutant("kernel-lse-natural-log", "kernels.py",
           "m_i + tl.math.log2(l_safe)", "m_i + tl.math.log(l_safe)", [KERNEL_DTYPES]),
    Mutant("kernel-default-scale-by-heads", "kernels.py",
           "scale = q.shape[2] ** -0.5 if scale is None else float(scale)",
           "scale = q.shape[1] ** -0.5 if scale is None else float(scale)",
           [KERNEL_DTYPES]),
    Mutant("kernel-dq-unscaled", "kernels.py",
           'dq = (dq_acc * ctx.sizes["sm_scale"]).to(q.dtype)', "dq = dq_acc.to(q.dtype)", [KERNEL_DTYPES]),
    # ---- train.py: the schedule and the loss
    Mutant("warmup-off-by-one", "train.py",
           "return cfg.lr * ((step + 1) / cfg.warmup)", "return cfg.lr * (step / cfg.warmup)", [LR, RUN_LR]),
    Mutant("step-takes-the-next-steps-rate", "train.py",
           "lr = get_lr(step, cfg)", "lr = get_lr(step + 1, cfg)", [RUN_LR]),
    Mutant("warmup-one-step-too-long", "train.py",
           "if step < cfg.warmup:", "if step <= cfg.warmup:", [LR]),
    Mutant("cosine-without-floor", "train.py",
           "0.1 + 0.45 * (1 + math.cos(math.pi * progress))", "0.5 * (1 + math.cos(math.pi * progress))", [LR]),
    Mutant("cosine-counts-the-warmup", "train.py",
           "(step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)", "step / max(1, cfg.steps)", [LR]),
    Mutant("cosine-past-the-end", "train.py",
           "progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))",
           "progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)", [LR]),
    Mutant("loss-label-shift-removed", "train.py",
           "hidden = m.decoder(x, positions, None, 0, cu_seqlens)[0, :-1]",
           "hidden = m.decoder(x, positions, None, 0, cu_seqlens)[0, 1:]", [LOSS]),
    Mutant("loss-mask-shifted-the-wrong-way", "train.py",
           "keep = labels[1:] != IGNORE", "keep = labels[:-1] != IGNORE", [LOSS]),
    Mutant("loss-mean-not-sum", "train.py",
           'return F.cross_entropy(logits, labels[1:][keep], reduction="sum")',
           'return F.cross_entropy(logits, labels[1:][keep], reduction="mean")', [LOSS]),
    # ---- sample.py: --viz and the settings
    Mutant("viz-draws-the-newline-column", "sample.py",
           "maps.append(tiles[:, :-1])", "maps.append(tiles)", [VIZ]),
    Mutant("viz-drops-the-first-column", "sample.py",
           "maps.append(tiles[:, :-1])", "maps.append(tiles[:, 1:])", [VIZ]),
    Mutant("viz-grid-transposed", "sample.py",
           ".view(bottom - top, right - left + 1)", ".view(right - left + 1, bottom - top)", [VIZ]),
    Mutant("viz-share-without-base-view", "sample.py",
           "shares.append(float(weights[begin:begin + n].sum()))",
           "shares.append(float(weights[begin + s * s:begin + n].sum()))", [VIZ]),
    Mutant("viz-red-without-offset", "sample.py",
           "(200 * (heat - low) / max(high - low, 1e-12))", "(200 * heat / max(high, 1e-12))", [VIZ]),
    Mutant("viz-sums-over-heads", "sample.py",
           "share = scores.softmax(-1).mean(dim=(0, 1, 2))", "share = scores.softmax(-1).sum(dim=(0, 1, 2))",
           ["tests/test_sample.py::test_attention_recording_leaves_the_answer_alone_and_restores_the_model"]),
    Mutant("viz-records-the-prefill", "sample.py",
           "if causal and q.shape[2] == 1:", "if causal:",
           ["tests/test_sample.py::test_attention_recording_leaves_the_answer_alone_and_restores_the_model"]),
    Mutant("options-zero-loses-to-the-file", "sample.py",
           "if getattr(args, key) is not None:", "if getattr(args, key):",
           ["tests/test_sample.py::test_command_line_options_win_over_generation_config"]),
    # ---- sample.py: LLaVA-Interleave Bench (issue 20)
    Mutant("bench-all-periods-deleted", "sample.py",
           'return LONE_PERIOD.sub("", out, count=PERIODS_DELETED)', 'return LONE_PERIOD.sub("", out)',
           ["tests/test_bench.py::test_only_32_periods_are_deleted"]),
    Mutant("bench-first-letter-wins", "sample.py",
           "            prediction = piece", "            return piece",
           ["tests/test_bench.py::test_the_last_single_letter_piece_wins"]),
    Mutant("bench-no-newline-after-an-image", "sample.py",
           "ids += [config.image_token_id] * slots + newline", "ids += [config.image_token_id] * slots",
           ["tests/test_bench.py::test_the_questions_are_asked_in_the_release_s_layout"]),
    # ---- train.py: LoRA and FSDP (issue 19)
    Mutant("lora-b-not-zero", "train.py",
           "torch.nn.init.zeros_(self.lora_B.weight)", "torch.nn.init.normal_(self.lora_B.weight, std=0.02)",
           ["tests/test_lora.py::test_at_step_0_the_adapted_model_gives_the_base_models_logits_exactly"]),
    Mutant("lora-merge-without-scale", "train.py",
           "return self.weight.float() + self.scale * delta", "return self.weight.float() + delta",
           ["tests/test_lora.py::test_the_merged_export_gives_the_adapted_models_logits"]),
    Mutant("fsdp-unused-gradients-kept", "train.py",
           "    drop_unused_gradients(wrapped.model, packs, device)", "    pass",
           ["tests/test_fsdp.py::test_fsdp_losses_equal_one_process"]),
]


@dataclasses.dataclass
class Outcome:
    """What a run of pytest said: passed or not, the first failing test, seconds, the output's end."""
    passed: bool
    caught_by: str
    seconds: float
    tail: str


def run_pytest(folder, tests, timeout):
    """pytest -x on `tests` in `folder`, in its own process group (killed whole on timeout)."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    # No bytecode: a mutated file and its original may share a size and a modification second.
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    start = time.time()
    process = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return Outcome(False, f"(timeout after {timeout} s)", time.time() - start, output[-2000:])
    seconds = time.time() - start
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    caught_by = failed.group(1) if failed else ("" if process.returncode == 0 else f"(exit {process.returncode})")
    return Outcome(process.returncode == 0, caught_by, seconds, output[-2000:])


def check_mutants(mutants):
    """Each mutant's old text must occur exactly once in its file, and names must be unique."""
    names = [m.name for m in mutants]
    if len(set(names)) != len(names):
        raise SystemExit("error: two mutants share a name")
    for m in mutants:
        with open(os.path.join(ROOT, m.file), encoding="utf-8") as f:
            count = f.read().count(m.old)
        if count != 1:
            raise SystemExit(f"error: mutant {m.name}: its old text occurs {count} times in {m.file}, not once; "
                             "update it to today's code")


def union_of_tests(mutants):
    """Every test argument of the mutants once, in order (for the unmutated run)."""
    seen = []
    for m in mutants:
        for test in m.tests:
            if test not in seen:
                seen.append(test)
    return seen


def short(test):
    """A test id without its folder, cut to 70 characters."""
    test = test.replace("tests/", "")
    return test if len(test) <= 70 else test[:67] + "..."


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=[], help="run the mutants whose names contain any of these")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--timeout", type=int, default=600, help="seconds for one mutant's tests (then: killed)")
    parser.add_argument("--out", default=RESULTS, help="where the table goes (with --only: nowhere unless given)")
    args = parser.parse_args(argv)
    check_mutants(MUTANTS)
    chosen = [m for m in MUTANTS if not args.only or any(word in m.name for word in args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.name:42} {m.file:13} {' '.join(short(t) for t in m.tests)}")
        return
    if not chosen:
        raise SystemExit(f"error: no mutant's name contains any of {args.only}; see --list")
    write = args.out if (not args.only or args.out != RESULTS) else None

    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        copy = os.path.join(tmp, "repo")
        shutil.copytree(ROOT, copy, ignore=IGNORED, symlinks=True)
        # ---- the tests must pass on the unmutated copy
        baseline = run_pytest(copy, union_of_tests(chosen), args.timeout)
        print(f"unmutated: {'passed' if baseline.passed else 'FAILED'} in {baseline.seconds:.0f} s", flush=True)
        if not baseline.passed:
            raise SystemExit("error: the mutants' tests fail without any mutant:\n" + baseline.tail)
        # ---- one mutant at a time
        rows = []
        for m in chosen:
            path = os.path.join(copy, m.file)
            with open(path, encoding="utf-8") as f:
                original = f.read()
            with open(path, "w", encoding="utf-8") as f:
                f.write(original.replace(m.old, m.new))
            try:
                outcome = run_pytest(copy, m.tests, args.timeout)
            finally:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(original)
            result = "survived" if outcome.passed else "killed"
            rows.append((m, result, outcome))
            print(f"{m.name:42} {result:8} {outcome.seconds:5.0f} s  {short(outcome.caught_by)}", flush=True)

    # ---- the table and the score
    killed = sum(result == "killed" for _, result, _ in rows)
    lines = [f"mutation score: {killed}/{len(rows)} killed ({100 * killed / len(rows):.0f}%)",
             f"date: {datetime.date.today().isoformat()}; commit: {git_commit()}; "
             f"command: python benchmarks/mutants.py{' --only ' + ' '.join(args.only) if args.only else ''}",
             "",
             f"{'mutant':42} {'file':13} {'result':8} {'seconds':>7}  caught by"]
    for m, result, outcome in rows:
        lines.append(f"{m.name:42} {m.file:13} {result:8} {outcome.seconds:7.0f}  {short(outcome.caught_by)}")
    lines += ["", "the mutants: in FILE, OLD -> NEW"]
    for m, _, _ in rows:
        lines.append(f"{m.name}: in {m.file}, {m.old.splitlines()[-1].strip()}  ->  {m.new.splitlines()[-1].strip()}")
    text = "\n".join(lines) + "\n"
    print("\n" + text, end="")
    if write:
        os.makedirs(os.path.dirname(write), exist_ok=True)
        partial = write + ".partial"
        with open(partial, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(partial, write)
        print(f"written to {os.path.relpath(write, ROOT)}")


def git_commit():
    """The working tree's commit (and "+ changes" when it has uncommitted ones), or "unknown"."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + changes" if dirty else "")


if __name__ == "__main__":
    main()
