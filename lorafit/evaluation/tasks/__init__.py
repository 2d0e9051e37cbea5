"""lm-eval task YAMLs shipped with lorafit (see lorafit/evaluation/harness.py)."""
