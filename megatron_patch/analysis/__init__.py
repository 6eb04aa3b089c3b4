"""Measures of expert specialization of a trained GPT-MoE (``tools/analyze_specialization.py``).

- ``metrics``: pure metric functions on routing decisions, scores, expert outputs and weights;
- ``capture``: forward hooks that collect each MoE layer's router logits, routing map and input;
- ``accumulate``: per-layer running statistics and the token sample of a pass over the data;
- ``experts``: every expert on a token sample, expert weight vectors (gathered over EP ranks);
- ``loading``: checkpoint -> model in this process layout, validation data with domains;
- ``runner``: the whole analysis; ``report``: JSON, Markdown and PNG output;
- ``labels``: the metric labels every report uses; ``reporting``: helpers the reports share;
- ``variants``, ``ablation``, ``ablation_report``, ``ablation_plots``: the
  specialization ablation (tools/ablation_report.py); ``sweep``: a coefficient sweep over it
  (tools/sweep_report.py).

The definitions are in ``docs/analysis.md`` and in the docstrings of ``metrics``.
"""
