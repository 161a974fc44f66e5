"""Not a test: proof that the tests can fail. Each entry patches one mechanism out of the code (a
literal replacement), runs the tests that guard it, expects every one of them to fail, and restores
the file, whatever happens. Run from the repository root:

    .venv/bin/python tests/mutations.py [WORDS...]     (only the entries whose name contains a word)

Prints one line per entry: "all fail (good)", or "SOME PASS" naming the count. Do not edit the code
while it runs: it rewrites the files it patches for the duration of each entry.
"""
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
# (name, file, text in it, its replacement, the tests that must fail)
MUTATIONS = [
 ("no gradient all-reduce", "distributed.py", "        if self.world > 1:\n            for p, summed in zip(", "        if False:\n            for p, summed in zip(",
  ["tests/test_distributed.py::test_two_ranks_of_batch_b_update_like_one_process_of_batch_2b"]),
 ("evaluation not gathered", "evaluation.py", "        if world > 1:\n            own = ", "        if False:\n            own = ",
  ["tests/test_distributed.py::test_a_two_rank_run_writes_what_one_process_writes_and_resumes_exactly"]),
 ("every rank trains the whole batch", "distributed.py", "        return indices[self.rank * size:(self.rank + 1) * size]", "        return indices",
  ["tests/test_distributed.py::test_two_ranks_of_batch_b_update_like_one_process_of_batch_2b"]),
 ("no mid-epoch checkpoint", "multitask_classifier.py", "        if cfg.checkpoint_every is not None and run.step", "        if False and run.step",
  ["tests/test_training.py::test_killed_mid_epoch_then_resumed_ends_exactly_as_the_uninterrupted_run"]),
 ("resume restarts the epoch's schedule", "multitask_classifier.py", "    if run.schedule is None:\n        run.schedule = epoch_task_schedule(",
  "    if True:\n        run.schedule = epoch_task_schedule(",
  ["tests/test_training.py::test_killed_mid_epoch_then_resumed_ends_exactly_as_the_uninterrupted_run",
   "tests/test_training.py::test_a_scheduler_signal_saves_after_the_step_and_exits_75"]),
 ("no signal handlers", "multitask_classifier.py", "    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}",
  "    previous = {}",
  ["tests/test_training.py::test_a_scheduler_signal_saves_after_the_step_and_exits_75"]),
 ("non-finite steps not skipped", "multitask_classifier.py",
  "    if not bool(torch.isfinite(torch.stack([grad_norm.float(), *losses.values()])).all()):",
  "    if False:",
  ["tests/test_training.py::test_a_non_finite_step_is_skipped_counted_and_training_goes_on",
   "tests/test_training.py::test_too_many_non_finite_steps_in_a_row_stop_with_the_last_checkpoint_intact",
   "tests/test_training.py::test_a_diverging_run_exits_with_status_3"]),
 ("skip leaves the momentum copy updated", "multitask_classifier.py",
  "        skip_step(run, losses)\n        return {}, tokens\n",
  "        skip_step(run, losses)\n        ema_update(run.ema_model.parameters(), run.model.parameters(), 0.5) if run.ema_model is not None else None\n        return {}, tokens\n",
  ["tests/test_training.py::test_a_non_finite_step_is_skipped_counted_and_training_goes_on"]),
 ("cli lets input errors through", "multitask_classifier.py", "    except InputError as e:\n        print(", "    except KeyError as e:\n        print(",
  ["tests/test_training.py::test_input_errors_are_one_line_without_traceback_and_exit_status_2"]),
 ("unsafe loading", "multitask_classifier.py", 'map_location="cpu", weights_only=True)', 'map_location="cpu", weights_only=False)',
  ["tests/test_training.py::test_a_checkpoint_that_would_run_code_is_refused"]),
 ("smart replay removed", "multitask_classifier.py",
  "        with replaying_rng(clean.rng_at_encode):\n            return model.logits_from_embeddings(task, embeddings, clean.mask)",
  "        return model.logits_from_embeddings(task, embeddings, clean.mask)",
  ["tests/test_mechanisms.py::test_smart_term_is_zero_without_perturbation_in_train_mode"]),
 ("perturbation forced to 0", "smart.py", "    return delta.detach()\n", "    return torch.zeros_like(delta).detach()\n",
  ["tests/test_mechanisms.py::test_smart_ascent_beats_random_perturbations_of_the_same_size",
   "tests/test_mechanisms.py::test_smart_gradient_is_a_real_share_of_the_task_gradient",
   "tests/test_smart.py::test_adversarial_loss_reaches_the_worst_case_of_a_linear_model_by_hand"]),
 ("ascent step removed (noise only)", "smart.py",
  "        delta = _project(delta.detach() + step_size * direction.to(x.dtype), eps, norm)",
  "        delta = _project(delta.detach(), eps, norm)",
  ["tests/test_mechanisms.py::test_smart_ascent_beats_random_perturbations_of_the_same_size",
   "tests/test_smart.py::test_adversarial_loss_reaches_the_worst_case_of_a_linear_model_by_hand"]),
 ("old SMART defaults (eps 1e-5, step 1e-3, noise_var 1e-5)", "config.py",
  'smart_eps: float = setting(0.1,', 'smart_eps: float = setting(1e-5,',
  ["tests/test_mechanisms.py::test_smart_gradient_is_a_real_share_of_the_task_gradient"]),
 ("teacher in eval mode", "multitask_classifier.py", "    ema_model.train(model.training)\n", "    ema_model.eval()\n",
  ["tests/test_mechanisms.py::test_bregman_teacher_is_compared_like_with_like"]),
 ("teacher without replayed masks", "multitask_classifier.py",
  "    with replaying_rng(clean.rng_at_embed):\n        return ema_model.logits(task, clean.batch)",
  "    return ema_model.logits(task, clean.batch)",
  ["tests/test_mechanisms.py::test_bregman_teacher_is_compared_like_with_like"]),
 ("Sophia h without bias correction", "optimizer.py",
  '        return state["hessian"] if n == 0 else state["hessian"] / (1 - group["betas"][1] ** n)',
  '        return state["hessian"]',
  ["tests/test_mechanisms.py::test_sophia_defaults_leave_the_cited_share_of_coordinates_unclipped",
   "tests/test_optimizer.py::test_sophia_hessian_is_bias_corrected_and_clip_statistics_count_unclipped_coordinates"]),
 ("Sophia old rho 0.04", "config.py", 'SOPHIA_RHO = {"sophiag": 2.0, "sophiah": 5e-4}', 'SOPHIA_RHO = {"sophiag": 0.04, "sophiah": 0.04}',
  ["tests/test_mechanisms.py::test_sophia_defaults_leave_the_cited_share_of_coordinates_unclipped"]),
 ("ordinal head built with C outputs", "multitask_classifier.py", "head_width(spec, sst_loss), n_hidden_layers", "head_width(spec), n_hidden_layers",
  ["tests/test_training.py::test_ordinal_sst_trains_and_predicts_every_class"]),
 ("correct_bias ignored", "optimizer.py", '            corrected = group.get("correct_bias", True)', '            corrected = True',
  ["tests/test_optimizer.py::test_adamw_correct_bias_by_hand[False-False]",
   "tests/test_optimizer.py::test_adamw_correct_bias_by_hand[False-True]"]),
 ("bias correction never applied", "optimizer.py", '            corrected = group.get("correct_bias", True)', '            corrected = False',
  ["tests/test_optimizer.py::test_adamw_correct_bias_by_hand[True-False]",
   "tests/test_optimizer.py::test_adamw_correct_bias_by_hand[True-True]"]),
 ("sophiag on argmax labels instead of samples", "multitask_classifier.py",
  "    labels = sample_labels(logits, kind, generator)\n",
  "    labels = logits.detach().argmax(-1) if kind == 'multiclass' else sample_labels(logits, kind, generator)\n",
  ["tests/test_techniques.py::test_sophiag_estimates_from_sampled_labels_not_the_true_ones"]),
 ("weight 0 not plain", "smart.py", "    if weight == 0:\n        return loss\n", "    if weight == 0:\n        return loss * 1.5\n",
  ["tests/test_smart.py::test_weight_zero_is_bit_identical_to_plain_training_and_weight_one_changes_gradients"]),
 ("bregman value wrong (KL one way)", "smart.py", "    return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1).mean()",
  "    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()",
  ["tests/test_smart.py::test_bregman_divergence_by_hand_with_the_momentum_model_as_a_fixed_target"]),
 ("encode ignores part of its input", "bert.py", "        x = embeddings\n", "        x = embeddings.detach() * 0 + self.embed(torch.zeros_like(attention_mask))\n",
  ["tests/test_bert.py::test_embed_encode_split_matches_reference_and_encodes_the_given_embeddings"]),
 ("non-refresh steps build a second-order graph", "multitask_classifier.py",
  "        if not self.active:\n            scaled.backward()\n", "        if not self.active:\n            scaled.backward(create_graph=True)\n",
  ["tests/test_techniques.py::test_hessian_estimate_refreshes_on_its_steps_only"]),
 ("individual_pretrain keeps no head", "multitask_classifier.py",
  "        model.heads[task].load_state_dict(", "        dict(",
  ["tests/test_training.py::test_individual_pretrain_keeps_each_tasks_best_head"]),
 ("conflicts recorded on every step", "multitask_classifier.py",
  "        if run.diagnostics.active:\n            record_gradient_conflicts(run, tasks, flat)",
  "        if True:\n            record_gradient_conflicts(run, tasks, flat)",
  ["tests/test_techniques.py::test_unlogged_steps_pay_nothing_for_diagnostics"]),
 ("grad share not logged", "multitask_classifier.py", '                diagnostics.add("technique/smart_grad_share",', '                (lambda *a: None)("technique/smart_grad_share",',
  ["tests/test_techniques.py::test_diagnostics_are_logged_under_their_documented_names",
   "tests/test_mechanisms.py::test_smart_gradient_is_a_real_share_of_the_task_gradient"]),
 ("cosines are dot products", "pcgrad.py", "    return {(i, j): torch.dot(task_grads[i], task_grads[j]) / (norms[i] * norms[j]).clamp(min=1e-30)",
  "    return {(i, j): torch.dot(task_grads[i], task_grads[j])",
  ["tests/test_pcgrad.py::test_gradient_cosines_by_hand"]),
 ("outputs not saved", "multitask_classifier.py", "        write_outputs(os.path.join(folder, f\"outputs-{split}.npz\"), by_task, outputs_meta(cfg, split, list(by_task)))",
  "        pass",
  ["tests/test_training.py::test_short_run_writes_course_predictions_and_test_option_reproduces_dev",
   "tests/test_ensemble.py::test_average_ensemble_writes_the_mean_of_its_members"]),
 ("ordinal probabilities not made monotone", "multitask_classifier.py", "torch.sigmoid(logits).cummin(-1).values", "torch.sigmoid(logits)",
  ["tests/test_training.py::test_ordinal_loss_and_predictions"]),
 ("average is the first member", "ensemble.py", "    return np.tensordot(weights, stack, axes=1).astype(np.float32)", "    return stack[0]",
  ["tests/test_ensemble.py::test_average_ensemble_writes_the_mean_of_its_members"]),
 ("dev halves not stratified", "ensemble.py", "        order = np.lexsort((rng.permutation(len(y)), strata))", "        order = rng.permutation(len(y))",
  ["tests/test_ensemble.py::test_dev_halves_are_disjoint_complete_seeded_and_stratified"]),
 ("greedy scored on every row", "ensemble.py", "candidates.append(score(combine(stacks, trial / trial.sum(), \"average\"), labels, rows)",
  "candidates.append(score(combine(stacks, trial / trial.sum(), \"average\"), labels, {t: np.arange(len(y)) for t, y in labels.items()})",
  ["tests/test_ensemble.py::test_greedy_selection_sees_only_the_selection_half"]),
 ("greedy stops after one pick", "ensemble.py", "    for _ in range(rounds):\n        candidates = []", "    for _ in range(1):\n        candidates = []",
  ["tests/test_ensemble.py::test_greedy_selection_adds_with_replacement_and_keeps_the_best_round"]),
 ("vote ties to the first class", "ensemble.py", "    return ((counts + 0.5 * stack.mean(0)) / (members + 0.5))", "    return ((counts + 0 * stack.mean(0)) / (members + 0.5))",
  ["tests/test_ensemble.py::test_vote_is_the_majority_with_ties_to_the_average_probability"]),
 ("members not checked against each other", "ensemble.py", "    check_compatible(members)\n", "",
  ["tests/test_ensemble.py::test_an_ensemble_can_be_a_member_and_mismatched_runs_are_refused"]),
 ("dev files not checked", "ensemble.py", "        matching = [path for path, digest in found.items() if digest == expected]", "        matching = list(found)",
  ["tests/test_ensemble.py::test_an_ensemble_can_be_a_member_and_mismatched_runs_are_refused"]),
 ("no confusion heatmaps", "multitask_classifier.py", "            writer.add_figure(f\"confusion/{task}\"", "            (lambda *a: None)(f\"confusion/{task}\"",
  ["tests/test_training.py::test_short_run_writes_course_predictions_and_test_option_reproduces_dev"]),
 ("seeds.sh reruns finished seeds", "sweeps/seeds.sh", '  if [ -f "$dir/summary.json" ]; then', "  if false; then",
  ["tests/test_ensemble.py::test_seeds_script_runs_each_seed_once_tabulates_and_ensembles"]),
 ("README links a missing file", "README.md", "| [docs/usage.md](docs/usage.md) |", "| [docs/usage.md](docs/use.md) |",
  ["tests/test_docs.py::test_the_readme_reads_in_five_minutes_and_its_links_resolve"]),
 ("preset ignored", "config.py", "        parser.set_defaults(**load_preset(preset))", "        load_preset(preset)",
  ["tests/test_hpo.py::test_a_preset_sets_defaults_that_flags_override_and_a_saved_config_is_one"]),
 ("preset types unchecked", "config.py", "            raise InputError(f\"--config {path}: {key} must be {expected}, got {value!r}\")", "            pass",
  ["tests/test_hpo.py::test_a_bad_preset_names_the_file_and_the_setting[float-type]",
   "tests/test_hpo.py::test_a_bad_preset_names_the_file_and_the_setting[int-type]",
   "tests/test_hpo.py::test_a_bad_preset_names_the_file_and_the_setting[bool-type]"]),
 ("epoch callback never called", "multitask_classifier.py", "            on_epoch(run.epoch, run.history[-1][\"dev\"])", "            pass",
  ["tests/test_hpo.py::test_a_trial_reports_each_epoch_and_the_pruner_stops_it",
   "tests/test_hpo.py::test_a_study_trains_each_trial_in_its_folder_continues_and_reports"]),
 ("study not continued", "hpo.py", "direction=\"maximize\", load_if_exists=True,", "direction=\"maximize\", load_if_exists=False,",
  ["tests/test_hpo.py::test_a_study_trains_each_trial_in_its_folder_continues_and_reports"]),
 ("a failed trial ends the study", "hpo.py", "                   catch=(Exception,), gc_after_trial=True)", "                   catch=(), gc_after_trial=True)",
  ["tests/test_hpo.py::test_an_impossible_trial_fails_and_the_study_goes_on"]),
 ("searched and fixed both allowed", "hpo.py", "            raise InputError(f\"{where}: also given as a flag; a setting is either searched or fixed\")", "            pass",
  ["tests/test_hpo.py::test_a_bad_space_is_refused_before_any_trial[also-fixed]"]),
 ("best preset keeps the study's budget", "hpo.py", " and k not in BUDGET and k != \"seed\"}", " and k != \"seed\"}",
  ["tests/test_hpo.py::test_a_study_trains_each_trial_in_its_folder_continues_and_reports"]),
 ("slurm task ignores its seed", "sweeps/slurm-array.sh", 'seed=${seeds[$(( i % ${#seeds[@]} ))]}', "seed=${seeds[0]}",
  ["tests/test_hpo.py::test_slurm_array_task_runs_its_preset_and_seed_once"]),
]
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still restores the patched file (finally)
only = sys.argv[1:]
for name, path, old, new, tests in MUTATIONS:
    if only and not any(o in name for o in only):
        continue
    full = f"{ROOT}/{path}"
    src = open(full).read()
    assert src.count(old) == 1, (name, src.count(old))
    open(full, "w").write(src.replace(old, new))
    try:
        r = subprocess.run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rA", *tests],
                           cwd=ROOT, capture_output=True, text=True)
    finally:
        open(full, "w").write(src)
    lines = r.stdout.splitlines()
    npass = sum(l.startswith("PASSED") for l in lines); nfail = sum(l.startswith("FAILED") for l in lines)
    summary = f"{nfail} failed, {npass} passed"
    every = nfail > 0 and npass == 0
    print(f"{'all fail (good)' if every else 'SOME PASS'} | {name} | {summary}", flush=True)
