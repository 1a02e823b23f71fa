"""Seeing and scoring the method: Q/K outlier profiles (``longact profile``) and benchmark scores (``longact eval``).

The evaluation core (:func:`~longact_lightning.data.scoring.evaluate_records`,
:func:`~longact_lightning.eval.evaluate.summarize`) is a plain function of an engine, a tokenizer and records, so
experiments (the LongAct ablation) and the validation loop of ``fit`` call it without the CLI.
"""
