"""Mutation check: does the test suite catch the bugs it claims to?

Applies each mutation of ``MUTATIONS`` (one small, named bug in the product) to a temporary copy
of the repository, runs the tests that claim to catch it there, and reports which mutants were
killed (a test failed) and which survived (every test passed: a blind spot). Before the mutants,
the same tests run on the unmutated copy and must pass, so a kill means the bug, not a broken
test. Exit status 0 when every mutant is killed, 1 otherwise.

Not part of CI (it runs the selected tests once per mutant: about 15-25 minutes on 2 cores):

  python scripts/mutation_check.py                  # all mutants, a table at the end
  python scripts/mutation_check.py --list           # the mutants and their tests
  python scripts/mutation_check.py --only pmean_to_psum,drop_normalize
  python scripts/mutation_check.py --json out.json  # the results as JSON as well

A mutation is a literal replacement of text that occurs exactly once in one file, so that the
list stays valid only while the code it names exists (a stale entry is an error, not a pass).
"""

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutation:
  """One bug: replace ``old`` (occurring exactly once in ``path``) by ``new``; ``tests`` must catch it."""
  name: str
  what: str
  path: str
  old: str
  new: str
  tests: tuple[str, ...]


MUTATIONS = (
    # --- training ---------------------------------------------------------------------------
    Mutation("swap_rates_in_training", "noise and signal rates swapped in the production train step",
             "ddim_jax/core/step.py", "noise_rates, signal_rates = step_config.diffusion.schedule_fn()(times)",
             "signal_rates, noise_rates = step_config.diffusion.schedule_fn()(times)",
             # The fast tier's test; the slow test_train.py::test_production_train_step_equals_the_closed_form_step
             # kills it too (and drop_normalize).
             ("tests/test_fast_numerics.py::test_the_production_step_equals_the_closed_form_and_the_twin",)),
    Mutation("drop_normalize", "the train step feeds [0, 1] images without the normaliser",
             "ddim_jax/core/step.py", "return train_step_from_draws(state, sampling.normalize(images, normalizer), noises,",
             "return train_step_from_draws(state, images, noises,",
             ("tests/test_fast_numerics.py::test_the_production_step_equals_the_closed_form_and_the_twin",)),
    Mutation("swap_rates_in_loss", "the loss's noisy images mix the noise by the signal rate and the image by the "
             "noise rate", "ddim_jax/core/step.py", "noisy_images = signal_rates * images + noise_rates * noises",
             "noisy_images = noise_rates * images + signal_rates * noises",
             ("tests/test_fast_numerics.py::test_the_production_step_equals_the_closed_form_and_the_twin",)),
    Mutation("ema_decay_inverted", "the EMA keeps 1 - decay of its average (decay <-> 1 - decay)",
             "ddim_jax/core/step.py", "decay = ema_decay_at(state.step, step_config.ema_decay, step_config.ema_warmup)",
             "decay = 1.0 - ema_decay_at(state.step, step_config.ema_decay, step_config.ema_warmup)",
             ("tests/test_fast_numerics.py::test_the_production_step_equals_the_closed_form_and_the_twin", "tests/test_fast_numerics.py::test_ema_warmup_over_production_steps_equals_the_recursion_and_the_twin")),
    Mutation("ema_warmup_constant_jax", "the EMA warm-up (1+n)/(11+n) instead of (1+n)/(10+n) (JAX)",
             "ddim_jax/core/step.py", "(1.0 + n) / (10.0 + n)", "(1.0 + n) / (11.0 + n)",
             ("tests/test_fast_numerics.py::test_ema_warmup_over_production_steps_equals_the_recursion_and_the_twin", "tests/test_fast_numerics.py::test_ema_decay_at_is_the_warmup_closed_form_in_both_twins")),
    Mutation("ema_warmup_constant_torch", "the EMA warm-up (1+n)/(11+n) instead of (1+n)/(10+n) (torch twin)",
             "ddim_torch_ref/step.py", "(1.0 + n) / (10.0 + n)", "(1.0 + n) / (11.0 + n)",
             ("tests/test_fast_numerics.py::test_ema_warmup_over_production_steps_equals_the_recursion_and_the_twin", "tests/test_fast_numerics.py::test_ema_decay_at_is_the_warmup_closed_form_in_both_twins")),
    Mutation("pmean_to_psum", "gradients summed over the devices instead of averaged",
             "ddim_jax/core/step.py", "grads, metrics = _pmean(grads, axis_name), _pmean(metrics, axis_name)",
             "grads, metrics = (grads if axis_name is None else jax.lax.psum(grads, axis_name)), "
             "_pmean(metrics, axis_name)",
             ("tests/test_train.py::test_device_count_invariance",)),
    Mutation("ema_not_restored", "a resumed run restarts its EMA from the raw weights",
             "ddim_jax/training/trainer.py", "    train_iter.set_state(meta[\"data_iterator\"])\n",
             "    train_iter.set_state(meta[\"data_iterator\"])\n"
             "    state = state.replace(ema_params=state.params, ema_batch_stats=state.batch_stats)\n",
             ("tests/test_train.py::test_sigterm_saves_current_step_and_resume_is_exact",)),
    Mutation("iterator_repeats_a_batch", "the data iterator repeats the last batch after a resume",
             "ddim_jax/data/iterator.py", "    self._epoch, self._index = epoch, index\n",
             "    self._epoch, self._index = epoch, max(index - 1, 0)\n",
             ("tests/test_train.py::test_sigterm_saves_current_step_and_resume_is_exact",)),
    # --- multi-process runs -------------------------------------------------------------------
    Mutation("preemption_by_step_number", "JAX's preemption sync point is matched against the step, not the call",
             "ddim_jax/training/trainer.py", "ckpt.reached_preemption(calls)", "ckpt.reached_preemption(step)",
             ("tests/test_train.py::test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step",)),
    Mutation("data_prepared_by_every_process", "every process builds the data cache at once",
             "ddim_jax/infra/parallel.py", "  if jax.process_count() == 1:\n    return fn()\n",
             "  if True:\n    return fn()\n",
             ("tests/test_train.py::test_two_processes_prepare_the_data_once",)),
    # --- model, sampler, weights and metrics ------------------------------------------------
    Mutation("skip_concat_reversed", "the up path concatenates [skip, x] instead of Keras' [x, skip]",
             "ddim_jax/core/models.py", "x = jnp.concatenate([x, skips.pop()], axis=-1)",
             "x = jnp.concatenate([skips.pop(), x], axis=-1)",
             # The fast tier's tests; the slow tests/test_parity.py::test_forward_parity kills it too.
             ("tests/test_fast_numerics.py::test_tiny_unet_equals_the_twin", "tests/test_fast_numerics.py::test_the_production_step_equals_the_closed_form_and_the_twin")),
    Mutation("skip_concat_reversed_torch", "the twin's up path concatenates [skip, x] instead of Keras' [x, skip]",
             "ddim_torch_ref/models.py", "x = block(torch.cat([x, skips.pop()], dim=1))",
             "x = block(torch.cat([skips.pop(), x], dim=1))",
             ("tests/test_fast_numerics.py::test_tiny_unet_equals_the_twin", "tests/test_fast_numerics.py::test_the_production_step_equals_the_closed_form_and_the_twin")),
    Mutation("sigma_without_eta", "DDIM's sigma ignores eta (right at eta = 1 only)",
             "ddim_jax/core/sampling.py", "return eta * (next_noise_rates / noise_rates) * jnp.sqrt(",
             "return (next_noise_rates / noise_rates) * jnp.sqrt(",
             ("tests/test_sampling.py::test_ddim_step_matches_paper_equations",)),
    Mutation("time_grid_off_by_one", "the sampler's times start one step below t = 1",
             "ddim_jax/core/solvers.py", "    times = 1.0 - np.arange(steps + 1, dtype=np.float64) / steps\n",
             "    times = 1.0 - np.arange(1, steps + 2, dtype=np.float64) / steps\n",
             ("tests/test_sampling.py::test_trajectory_shapes_final_state_and_time_grid",)),
    Mutation("dpmpp_step_ratio_inverted", "DPM-Solver++(2M)'s step-size ratio r = h_{i-1}/h_i inverted",
             "ddim_jax/core/solvers.py", "    r = h[:-2] / h[1:-1]  # r_i", "    r = h[1:-1] / h[:-2]  # r_i",
             ("tests/test_solvers.py::test_dpmpp_2m_is_second_order_on_the_closed_form_ode",
              "tests/test_solvers.py::test_time_grids")),
    Mutation("dpmpp_twin_second_order_halved", "the torch twin's second-order weight 1/(2r) is 1/r",
             "ddim_torch_ref/solvers.py", "    c[1:-1] = 1.0 + 1.0 / (2.0 * r)\n    d[1:-1] = -1.0 / (2.0 * r)",
             "    c[1:-1] = 1.0 + 1.0 / r\n    d[1:-1] = -1.0 / r",
             ("tests/test_solvers.py::test_time_grids",
              "tests/test_solvers.py::test_the_twins_and_k_diffusions_dpmpp_2m_agree_on_the_closed_form_model")),
    Mutation("kernel_not_transposed", "weight-file kernels written HWIO -> OIWH (spatially transposed)",
             "ddim_jax/interop/weight_files.py", "value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW",
             "value = value.transpose(3, 2, 1, 0)  # HWIO -> OIHW",
             ("tests/test_convert.py::test_kernel_layout_is_oihw",)),
    Mutation("kid_with_diagonal", "KID's same-set kernel means keep the diagonal",
             "ddim_jax/quality/metrics.py", "off_diagonal = 1.0 - jnp.eye(n, dtype=kernel.dtype)",
             "off_diagonal = jnp.ones((n, n), dtype=kernel.dtype)",
             ("tests/test_metrics.py::test_kid_batch_matches_float64_double_loop",)),
    Mutation("inversion_wrong_time", "DDIM inversion conditions the network on the current instead of the next time",
             "ddim_jax/core/sampling.py",
             "pred_noises = network_fn(noisy_images, network_variances(next_noise_rates, next_signal_rates, target))",
             "pred_noises = network_fn(noisy_images, network_variances(noise_rates, signal_rates, target))",
             ("tests/test_inversion.py::test_inversion_visits_the_sampler_states_in_reverse",)),
    Mutation("normalize_by_variance", "the normaliser divides by the variance instead of the standard deviation",
             "ddim_jax/core/sampling.py", "return (images - mean) / jnp.maximum(jnp.sqrt(variance), 1e-7)",
             "return (images - mean) / jnp.maximum(variance, 1e-7)",
             ("tests/test_sampling.py::test_normalize_and_denormalize_closed_forms_in_both_twins",)),
    # --- commands: outputs by value ---------------------------------------------------------
    Mutation("sample_noise_key", "`sample` draws every batch's noise from the same key",
             "ddim_jax/inference/pipeline.py", "jax.random.split(jax.random.fold_in(jax.random.key(seed), start))",
             "jax.random.split(jax.random.fold_in(jax.random.key(seed), 0))",
             ("tests/test_cli_sample.py::test_sample_without_numpy_noise_uses_the_documented_jax_keys",)),
    Mutation("weight_file_target_ignored", "a weight file's prediction target does not reach the sampler",
             "ddim_jax/core/schedules.py", 'str(metadata.get("target", "noise"))', '"noise"',
             ("tests/test_cli_sample.py::test_weight_file_metadata_drives_the_sampler",)),
    Mutation("strip_columns_floor", "the trajectory strip picks floor- instead of round-spaced steps",
             "ddim_jax/inference/grids.py", "np.unique(np.round(np.linspace(0, num_steps - 1, max_columns))",
             "np.unique(np.floor(np.linspace(0, num_steps - 1, max_columns))",
             ("tests/test_cli_sample.py::test_pick_columns_is_evenly_spaced_with_first_and_last",)),
    Mutation("figures_reverse_start", "the reverse figure starts from the t = 0.9 image",
             "ddim_jax/inference/figures.py", "out = sampling.generate(model, variables, top[-1:],",
             "out = sampling.generate(model, variables, top[-2:-1],",
             ("tests/test_cli_figures.py::test_figures_forward_reverse_and_samples",)),
    Mutation("evaluate_noise_key", "`evaluate` draws its noise from another key than documented",
             "ddim_jax/inference/evaluation.py", "jax.random.normal(jax.random.fold_in(key, i), shape)",
             "jax.random.normal(jax.random.fold_in(key, i + steps), shape)",
             ("tests/test_cli_evaluate.py::test_evaluate_writes_a_kid_table_and_json",)),
    Mutation("invert_reports_other_steps", "`invert` reports the errors of one more inversion step",
             "ddim_jax/inference/inversion.py", "invert(model, variables, batch, normalizer, steps=int(steps),",
             "invert(model, variables, batch, normalizer, steps=int(steps) + 1,",
             ("tests/test_cli_figures.py::test_invert_reports_errors_and_writes_a_figure",)),
    # --- data ---------------------------------------------------------------------------------
    Mutation("r_split_antialiased", "the R preprocessing resizes with antialiasing",
             "ddim_jax/data/tfds_source.py", 'options.antialias, f"{name} {split}")', 'True, f"{name} {split}")',
             ("tests/test_data.py::test_flowers_r_split_and_no_antialias",)),
    Mutation("r_split_overlap", "the R split's validation part overlaps the training part",
             "ddim_jax/data/splits.py", "return np.sort(order[:num_train]), np.sort(order[num_train:])",
             "return np.sort(order[:num_train]), np.sort(order[:num_examples - num_train])",
             ("tests/test_data.py::test_flowers_r_split_and_no_antialias",)),
    # --- model and schedule constants both twins could share ----------------------------------
    Mutation("bn_momentum_swapped_jax", "the BatchNorm momenta of the two variants swapped (Flax)",
             "ddim_jax/core/models.py", '"keras": VariantSpec(bn_momentum=0.99,', '"keras": VariantSpec(bn_momentum=0.9,',
             ("tests/test_models.py::test_batchnorm_momentum_is_the_originals",)),
    Mutation("bn_momentum_swapped_torch", "the BatchNorm momenta of the two variants swapped (torch twin)",
             "ddim_torch_ref/models.py", '"r": VariantSpec(bn_momentum=0.9,', '"r": VariantSpec(bn_momentum=0.99,',
             ("tests/test_models.py::test_batchnorm_momentum_is_the_originals",)),
    Mutation("bn_epsilon_keras_r", "the R variant's BatchNorm epsilon is Keras' 1e-3",
             "ddim_jax/core/models.py", '"r": VariantSpec(bn_momentum=0.9, bn_epsilon=1e-5,',
             '"r": VariantSpec(bn_momentum=0.9, bn_epsilon=1e-3,',
             ("tests/test_models.py::test_batchnorm_epsilon_is_the_originals",)),
    Mutation("linear_beta_end", "the linear schedule's last beta 0.021 instead of 0.02 (both twins share the "
             "table's form)", "ddim_jax/core/schedules.py", "betas = np.linspace(1e-4, 0.02, num_timesteps",
             "betas = np.linspace(1e-4, 0.021, num_timesteps",
             ("tests/test_schedules.py::test_linear_schedule_is_the_clipped_ddpm_table",)),
    Mutation("linear_index_off_by_one", "the linear schedule's table index floor(t * 1000) instead of floor(t * 999)",
             "ddim_jax/core/schedules.py", "xp.floor(diffusion_times * (num_timesteps - 1))",
             "xp.floor(diffusion_times * num_timesteps)",
             ("tests/test_schedules.py::test_linear_schedule_is_the_clipped_ddpm_table",)),
    Mutation("preset_ema_decay", "the default preset's EMA decay 0.99 instead of Keras' 0.999",
             "ddim_jax/configs/default.py", "config.train.ema_decay = 0.999", "config.train.ema_decay = 0.99",
             ("tests/test_configs.py::test_presets_hold_the_originals_settings",)),
    Mutation("preset_r_antialias", "the R preset resizes with antialiasing (R does not)",
             "ddim_jax/configs/r_variant.py", "config.data.antialias = False", "config.data.antialias = True",
             ("tests/test_configs.py::test_presets_hold_the_originals_settings",)),
    # --- files and directories --------------------------------------------------------------
    Mutation("inception_pickle_jax", "the Flax Inception loader unpickles arbitrary objects",
             "ddim_jax/quality/inception_weights.py", 'torch.load(path, map_location="cpu", weights_only=True)',
             'torch.load(path, map_location="cpu", weights_only=False)',
             ("tests/test_convert.py::test_inception_pth_loaders_refuse_pickled_code",)),
    Mutation("inception_pickle_torch", "the torch twin's Inception loader relies on torch's default",
             "ddim_torch_ref/inception.py", 'torch.load(path, map_location="cpu", weights_only=True)',
             'torch.load(path, map_location="cpu")',
             ("tests/test_convert.py::test_inception_pth_loaders_refuse_pickled_code",)),
    Mutation("checkpoint_dir_not_checked", "an unwritable checkpoint directory is accepted",
             "ddim_jax/infra/checkpointing.py", "  if not os.access(path, os.W_OK | os.X_OK):", "  if False:",
             ("tests/test_checkpointing.py::test_unwritable_or_uncreatable_directory_raises",)),
    # --- the workdir as the record of a run ----------------------------------------------------
    Mutation("metrics_kept_after_resume", "a resumed run keeps the records of the steps it trains again",
             "ddim_jax/training/reporting.py", "        _truncate_records(local_jsonl, start_step)\n", "        pass\n",
             ("tests/test_run_record.py::test_a_resumed_run_leaves_each_step_once_in_metrics_and_tensorboard",)),
    Mutation("tensorboard_not_purged", "TensorBoard keeps the stale points of the steps trained again",
             "ddim_jax/training/reporting.py", "purge_step=int(start_step) + 1)", "purge_step=None)",
             ("tests/test_run_record.py::test_a_resumed_run_leaves_each_step_once_in_metrics_and_tensorboard",)),
    Mutation("resume_guard_off", "a workdir of another config is resumed (and fails deep in orbax)",
             "ddim_jax/infra/run_record.py", "  if refused:\n", "  if False:\n",
             ("tests/test_run_record.py::test_run_record_and_the_resume_guard",)),
    Mutation("saved_state_not_checked", "a non-finite state is saved when the loss before the update was finite",
             "ddim_jax/training/trainer.py", "    if not bool(_to_host(self.state_is_finite(state))):", "    if False:",
             ("tests/test_run_record.py::test_a_non_finite_state_is_never_saved",)),
    Mutation("progress_counts_dispatched", "the progress report counts steps when dispatched, not when finished",
             "ddim_jax/training/trainer.py", "      step += run.feed.steps_of(batch, run.feed.placement)\n      calls += 1\n",
             "      step += run.feed.steps_of(batch, run.feed.placement)\n      calls += 1\n      run.report.finished(step)\n",
             ("tests/test_run_record.py::test_the_loop_reports_steps_only_after_they_finished",)),
    Mutation("best_is_newest", "`--step best` loads the newest checkpoint with a KID",
             "ddim_jax/infra/checkpointing.py", "return min(scores, key=lambda s: (scores[s], s)) if scores else None",
             "return max(scores) if scores else None",
             ("tests/test_run_record.py::test_select_step_best_is_the_lowest_kid_not_the_newest",)),
    Mutation("every_value_error_one_line", "the CLI turns every ValueError (bugs too) into one line",
             "ddim_jax/cli.py", "EXPECTED_ERRORS = (errors.Error, FileNotFoundError,",
             "EXPECTED_ERRORS = (errors.Error, ValueError, FileNotFoundError,",
             ("tests/test_run_record.py::test_bugs_keep_their_traceback_and_debug_shows_expected_ones",)),
    Mutation("plain_log_off_terminal", "a redirected run writes tqdm's carriage-return bar instead of log lines",
             "ddim_jax/training/reporting.py", "self.interactive = sys.stderr.isatty() if interactive is None else interactive",
             "self.interactive = True if interactive is None else interactive",
             ("tests/test_run_record.py::test_a_redirected_run_prints_the_banner_and_plain_log_lines",)),
    Mutation("frechet_without_cross_term", "the Frechet distance drops 2 tr((cov1 cov2)^(1/2))",
             "ddim_jax/quality/metrics.py", "np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)",
             "np.trace(cov1) + np.trace(cov2))",
             ("tests/test_digits_metric.py::test_frechet_distance_closed_forms",)),
    Mutation("digits_reference_is_train", "the digits metric's reference set is the training split",
             "ddim_jax/quality/digits_metric.py", 'reference = cls._split_images(data_config, image_size)["validation"]',
             'reference = cls._split_images(data_config, image_size)["train"]',
             ("tests/test_digits_metric.py::test_reference_is_the_validation_split",)),
    # --- nothing a user does harms a run -------------------------------------------------------
    Mutation("no_workdir_lock", "a second trainer on a workdir is not refused",
             "ddim_jax/training/trainer.py", "  lock = workdir_lock.lock_for_training(workdir)\n", "  lock = None\n",
             ("tests/test_workdir_safety.py::test_a_second_trainer_is_refused_naming_the_first",)),
    Mutation("readers_open_for_writing", "export/sample open the checkpoints as a writer (clean-up, write check)",
             "ddim_jax/inference/pipeline.py",
             "best_metric=checkpointing.BEST_METRIC, async_save=False, read_only=True)",
             "best_metric=checkpointing.BEST_METRIC, async_save=False, read_only=False)",
             ("tests/test_workdir_safety.py::test_readers_work_on_a_read_only_workdir_and_change_nothing",)),
    Mutation("partial_metrics_line_crashes", "a partial last line of metrics.jsonl makes every resume fail",
             "ddim_jax/training/reporting.py", "  steps = [_record_step(line) if line.strip() else None for line in lines]\n",
             "  steps = [json.loads(line)[\"step\"] if line.strip() else None for line in lines]\n",
             ("tests/test_workdir_safety.py::test_a_partial_last_metrics_line_is_dropped_on_resume",)),
    # --- one owner for every file (ddim_jax/files.py, infra/run_dir.py, the lock) ---------------
    Mutation("append_follows_links", "records are appended without O_NOFOLLOW (through a link, to a file outside)",
             "ddim_jax/files.py",
             "fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC, 0o666)",
             "fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | _O_NONBLOCK | _O_CLOEXEC, 0o666)",
             ("tests/test_path_safety.py::test_primitives_never_write_through_or_wait",)),
    Mutation("lock_follows_links", "the workdir lock is opened without O_NOFOLLOW (truncates a linked file)",
             "ddim_jax/infra/workdir_lock.py",
             'flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)',
             'flags = os.O_RDWR | getattr(os, "O_NONBLOCK", 0)',
             ("tests/test_path_safety.py::test_the_lock_never_writes_through_what_is_at_its_name",)),
    Mutation("lock_released_without_token_check", "a trainer's exit removes whatever lock is there, another's too",
             "ddim_jax/infra/workdir_lock.py", "      elif self._fd is not None and self._is_at_path(self._fd):\n",
             "      elif self._fd is not None:\n",
             ("tests/test_path_safety.py::test_the_lock_is_released_only_by_its_holder",)),
    Mutation("runs_appended_as_rewrite", "runs.jsonl is rewritten in place (truncate, then write it all) per start",
             "ddim_jax/infra/run_dir.py", '      files.append_record(self.runs, line, "the workdir\'s")',
             '      (lambda text: open(self.runs, "w", encoding="utf-8").write(text))((self._read_text(self.RUNS) or "")'
             ' + line)',
             ("tests/test_path_safety.py::test_a_killed_runs_jsonl_write_loses_no_record",)),
    Mutation("fresh_without_journal", "train --fresh moves the run without its journal (a kill leaves it split)",
             "ddim_jax/infra/run_dir.py", '      files.replace_text(self.journal, journal, "the workdir\'s")\n'
             "    return self.finish_set_aside()",
             "      files.ensure_folder(self.path(self.PREVIOUS, dest))\n"
             "      for name in moved:\n"
             "        os.rename(self.path(name), self.path(self.PREVIOUS, dest, name))\n"
             "    return self.path(self.PREVIOUS, dest)",
             ("tests/test_path_safety.py::test_a_fresh_killed_at_any_step_is_finished_by_the_next_start",)),
    Mutation("retention_deletes_any_step_folder", "retention counts a user's checkpoints/7/ as a step (and deletes it)",
             "ddim_jax/infra/checkpointing.py", "    if (epath.Path(metadata.path) / STEP_MARK).exists():\n",
             "    if True:\n",
             ("tests/test_path_safety.py::test_retention_and_restore_never_touch_a_users_step_named_folder",)),
    # --- the accelerator path ------------------------------------------------------------------
    Mutation("calls_pass_over_events", "a call of K steps runs past a log or checkpoint step",
             "ddim_jax/training/feed.py", "    if any(p > 0 and (end - 1) // p > step // p for p in self.intervals):\n",
             "    if False:\n",
             ("tests/test_feed.py::test_the_call_plan_lands_on_every_event",)),
    Mutation("keras_order_ties_reversed", "Keras's layer order breaks ties the other way (a Keras file's groups "
             "mapped to the wrong layers)",
             "ddim_jax/interop/keras_files.py", "key=lambda i: (-depth[i], visit_index[i]))",
             "key=lambda i: (-depth[i], -visit_index[i]))",
             ("tests/test_keras_files.py::test_the_layer_order_rule_is_keras_own",)),
    Mutation("keras_kernel_not_transposed", "a Keras kernel read HWIO -> OIWH (spatially transposed)",
             "ddim_jax/interop/keras_files.py", "values[0].transpose(3, 2, 0, 1)  # HWIO -> OIHW",
             "values[0].transpose(3, 2, 1, 0)  # HWIO -> OIHW",
             ("tests/test_keras_files.py::test_keras_jax_and_torch_agree_on_the_converted_model",)),
    Mutation("bf16_rows_in_float32", "parity --precision bf16 runs JAX in float32 (the bf16 rows compare nothing)",
             "ddim_jax/interop/parity_check.py", "half = model.clone(dtype=jnp.bfloat16)", "half = model",
             ("tests/test_parity_check.py::test_bf16_parity_holds_its_bounds_and_is_really_bfloat16",)),
)


def _copy_repo(target: str) -> None:
  """Copies the tracked and untracked-but-not-ignored files of the repository to ``target``."""
  files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                         capture_output=True).stdout.decode().split("\0")
  for name in filter(None, files):
    source = os.path.join(REPO, name)
    if not os.path.isfile(source):
      continue  # deleted but not yet staged
    os.makedirs(os.path.dirname(os.path.join(target, name)), exist_ok=True)
    shutil.copy2(source, os.path.join(target, name))


def _env(copy: str) -> dict:
  """The test environment of the copy: its packages first on the path (the venv's editable
  install points at the original checkout)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = copy + os.pathsep + env.get("PYTHONPATH", "")
  env["PYTHONDONTWRITEBYTECODE"] = "1"
  return env


def _run_tests(copy: str, tests, workers: int, timeout: int, label: str) -> tuple[int, str, float]:
  """Runs ``tests`` in the copy; returns (exit status, the lines naming failures, seconds).

  The whole pytest output is kept in ``<copy>/.mutation_tmp/<label>.log`` (printed for a baseline
  failure).

  Each run gets a fresh pytest base directory: the session fixtures cache data and trained
  models beside it, and a mutant must not be judged with a cache its predecessor built.
  """
  basetemp = os.path.join(copy, ".mutation_tmp", label, "base")
  os.makedirs(os.path.dirname(basetemp), exist_ok=True)
  cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-n", str(workers),
         f"--basetemp={basetemp}", *tests]
  start = time.time()
  try:
    result = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout,
                            check=False)
  except subprocess.TimeoutExpired:
    return -1, "timeout", time.time() - start
  with open(os.path.join(copy, ".mutation_tmp", f"{label}.log"), "w", encoding="utf-8") as f:
    f.write(result.stdout + result.stderr)
  failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
  return result.returncode, "; ".join(failed)[:300] or result.stdout.strip().splitlines()[-1:][0], time.time() - start


def _apply(copy: str, mutation: Mutation) -> str:
  """Applies ``mutation`` in the copy; returns the original text of the file."""
  path = os.path.join(copy, mutation.path)
  with open(path, encoding="utf-8") as f:
    text = f.read()
  count = text.count(mutation.old)
  if count != 1:
    raise ValueError(f"mutation {mutation.name}: the text to replace occurs {count} times in {mutation.path} "
                     "(expected once); update MUTATIONS to the current code")
  with open(path, "w", encoding="utf-8") as f:
    f.write(text.replace(mutation.old, mutation.new))
  return text


def _check_imports_from(copy: str) -> None:
  code = "import ddim_jax, ddim_torch_ref; print(ddim_jax.__file__); print(ddim_torch_ref.__file__)"
  out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=_env(copy), capture_output=True, text=True,
                       check=True).stdout.split()
  if not all(path.startswith(copy) for path in out):
    raise RuntimeError(f"the copy's tests would import the packages from elsewhere: {out}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", default=None, help="comma-separated mutation names")
  parser.add_argument("--list", action="store_true", help="list the mutations and exit")
  parser.add_argument("--workers", type=int, default=0, help="pytest-xdist workers per run (0: in process)")
  parser.add_argument("--timeout", type=int, default=1200, help="seconds per test run")
  parser.add_argument("--no-baseline", action="store_true", help="skip the run on the unmutated copy")
  parser.add_argument("--json", default=None, help="also write the results to this JSON file")
  args = parser.parse_args(argv)

  names = [m.name for m in MUTATIONS]
  if len(set(names)) != len(names):
    raise SystemExit("duplicate mutation names")
  selected = MUTATIONS
  if args.only:
    wanted = set(args.only.split(","))
    unknown = wanted - set(names)
    if unknown:
      raise SystemExit(f"unknown mutation(s) {sorted(unknown)}; --list shows them")
    selected = tuple(m for m in MUTATIONS if m.name in wanted)
  if args.list:
    for m in selected:
      print(f"{m.name:<32} {m.path:<32} {m.what}\n{'':<32} tests: {' '.join(m.tests)}")
    return 0

  results = []
  with tempfile.TemporaryDirectory(prefix="ddim_mutation_") as copy:
    _copy_repo(copy)
    _check_imports_from(copy)
    if not args.no_baseline:
      tests = sorted({t for m in selected for t in m.tests})
      print(f"baseline: {len(tests)} tests on the unmutated copy ...", flush=True)
      rc, detail, seconds = _run_tests(copy, tests, args.workers, args.timeout, "baseline")
      if rc != 0:
        with open(os.path.join(copy, ".mutation_tmp", "baseline.log"), encoding="utf-8") as f:
          print(f.read()[-4000:])
        print(f"baseline FAILED ({detail}); fix the tests before judging mutants")
        return 2
      print(f"baseline passed in {seconds:.0f}s", flush=True)
    for m in selected:
      original = _apply(copy, m)
      try:
        rc, detail, seconds = _run_tests(copy, m.tests, args.workers, args.timeout, m.name)
      finally:
        with open(os.path.join(copy, m.path), "w", encoding="utf-8") as f:
          f.write(original)
      verdict = "killed" if rc != 0 else "SURVIVED"
      results.append({"name": m.name, "what": m.what, "path": m.path, "verdict": verdict, "exit_status": rc,
                      "seconds": round(seconds, 1), "detail": detail, "tests": list(m.tests)})
      print(f"{verdict:>8}  {m.name}  ({seconds:.0f}s)  {detail}", flush=True)

  print("\n| mutation | what | verdict | killed by | s |\n|---|---|---|---|---:|")
  for r in results:
    killer = r["detail"] if r["verdict"] == "killed" else "-"
    print(f"| `{r['name']}` | {r['what']} | {r['verdict']} | {killer} | {r['seconds']:.0f} |")
  survived = [r["name"] for r in results if r["verdict"] != "killed"]
  print(f"\n{len(results) - len(survived)} of {len(results)} mutants killed"
        + (f"; SURVIVED: {', '.join(survived)}" if survived else ""))
  if args.json:
    from ddim_jax import files  # pylint: disable=import-outside-toplevel
    files.ensure_parent(args.json, "--json")
    files.replace_text(args.json, json.dumps(results, indent=2), "--json")
  return 1 if survived else 0


if __name__ == "__main__":
  sys.exit(main())
