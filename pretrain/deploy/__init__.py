"""Shipping a model: `distil export` (command) turns a model folder into ONNX forms (runtime), checked and timed
on its dev set (source), and `distil review` shows the forms of an experiment's exports (view)."""
