"""Evaluation (``first-gguf eval``): quality against speed, FiRST routers against static skipping.

For every (task or held-out source, strategy, budget) on the same prompts and the
same runtime, the measures asked for (``EvalConfig.measures``):

``nll`` (the default):

- extra NLL: mean negative log-likelihood per token of the reference
  continuation minus the full model's (teacher-forced, Model.score_tokens: prompt
  at full depth, continuation decoded with the blocks skipped); None for a
  source without references (``everyday``, ``coding``);
- agreement: fraction of greedy tokens equal to the full model's greedy output
  (position by position, over ``gen_tokens``);
- the task metric on the greedy output: ROUGE-L (summarization, docs, news), chrF
  and BLEU (translation, de), exact match / token F1 (qa), whether the reply's
  first word is the reference's yes or no (yesno); multiple choice (mc) is scored
  by log-likelihood of each option through Model.score_tokens (accuracy);

``onpolicy``: KL(p_skip || p_full) on temperature-1 samples of the skipped model
(``measures.onpolicy_kl``; 0 by definition in the ``full`` rows);

``repetition``: repeated token 4-grams and runs of one token in greedy replies
(``measures.greedy_repetition``), the full model's own figure in the ``full`` rows;

and which blocks were skipped (for the per-task heatmap). Rows belong to a group:
``in-distribution`` (a task's test or dev split) or ``held-out source``
(``first_gguf.datasets.heldout``: sources no training set draws from).

Strategies: ``full`` (budget 0), then any skip strategy ``Model.check_skip`` accepts
under its own name: ``router``, ``static`` (the GGUF's default ranking), any stored
ranking by name (``block_influence``, ``router_mean``, ``greedy_nll``), ``random``
(averaged over ``random_seeds`` seeded draws) and ``last``. Results are appended per
(task, strategy, budget) to ``results.jsonl`` in the output folder, so an
interrupted run resumes where it stopped; ``results.json``, ``results.csv`` and the
plots are rewritten at the end.

Modules: ``metrics`` (the task metrics, pure functions), ``loop`` (``EvalConfig``,
``evaluate`` and the measuring of a row, resuming), ``report`` (files, plots and
Markdown tables written from the rows; ``compare_measures`` for several folders).
"""
from __future__ import annotations

from ..datasets.heldout import load_heldout, parse_heldout
from ..datasets.tasks import TASKS, Example, load_task, parse_tasks, split
from .loop import (MEASURES, EvalConfig, _check_resume, _run_settings, check_config, evaluate,
                   parse_measures)
from .metrics import bleu, chrf, exact_match, rouge_l, task_metrics, token_f1, yes_no_match
from .report import (CSV_MEASURES, HELDOUT, IN_DISTRIBUTION, compare_measures, load_results, measures_table,
                     parse_labelled, plot, summary_table, write_results)

__all__ = ["EvalConfig", "MEASURES", "evaluate", "measures_table", "parse_measures", "plot", "summary_table",
           "task_metrics", "TASKS", "compare_measures"]
