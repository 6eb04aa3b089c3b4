"""The benchmarks behind the thin scripts of ``benchmarks/``.

Loss benchmark (``benchmarks/bench_moe_losses.py``), one module a job:

    sizes        what a run measures per device (LayerSize, Plan), the seed, the loss coefficient
    timing       interleaved median timing, peak memory, saved-for-backward bytes, progress log
    losses       parts 1 and 3: the loss functions vs naive loops, their cost as T, k, H grow
    layers       part 2: one MoE layer without vs with L_o + L_v; the expert GEMM estimate
    collectives  part 4: collectives counted in a 2-process gloo run with expert parallelism 2
    tail         part 5: L_o's marginal cost in the combine tail, per kernel
    suite        the five parts in one run
    plot         the scaling plot
    report       the Markdown sections, the device file and the index

Device and CPU names and versions come from ``megatron_patch.machine``. Other benchmarks: ``tuning`` (launch settings of the fused L_o kernel,
``benchmarks/tune_gated_gram.py``) and ``orthogonal`` (cost of the orthogonal expert optimizer,
``benchmarks/bench_orthogonal_optimizer.py``).
"""
