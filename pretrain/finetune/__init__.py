"""`distil finetune`: GLUE-format fine-tuning and evaluation of a BERT-family encoder (the paper's Tables 1
and 3), with transformers' Trainer as the loop.

tasks.py    the GLUE tasks (file layout, labels, metrics) and the custom task
data.py     reading a split into examples (GLUE TSV, CSV, TSV, JSONL), with one-line errors
metrics.py  GLUE's metrics from scikit-learn / scipy, task scores, the median over seeds
model.py    loading the encoder with a fresh classification head, tokenising, inference timing (Table 3)
run.py      the command: settings, validation before any work, seeds, the report, test predictions
track.py    MLflow: a parent run per model and task (the medians), a child run per seed (per-epoch metrics)
glue_view.py  `distil review`'s GLUE table (Table 1), inference table (Table 3) and plot
"""
