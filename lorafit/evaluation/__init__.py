"""`lorafit eval`: score a base and its adapters side by side on held-out data, and bridge to
lm-evaluation-harness.

    metrics   the generation metrics: exact match, contains, regex, a Python scorer `module:function`
    score     loss / perplexity and greedy answers of every model in mixed-adapter batches
    report    results.json, results.md and the wrong answers per model
    run       the command: load once, score, report (and lm-eval, when asked)
    harness   lm-eval's `lorafit` model type (in process, the loaded model and its adapters)
    tasks/    tiny local lm-eval tasks (YAML + JSONL, no hub)
"""
