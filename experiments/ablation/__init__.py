"""The LongAct ablation: four row-selection arms x several seeds, trained and evaluated on the same data.

Arms (``--longact.mode``): ``high`` (LongAct: update the most salient 30 % of the W_Q / W_K rows), ``none`` (uniform
updates, the baseline), ``random`` (a random 30 % of the rows: the same sparsity without the saliency) and ``low`` (the
least salient 30 %). For every seed all arms see the same prompt stream, the same rollout sampling seed and the same
held-out set, so the comparison with ``none`` is paired by seed. ``runs`` trains and scores one arm x seed,
``report`` turns the results into tables and a plot, ``stats`` holds the statistics, ``__main__`` drives it all.
"""
