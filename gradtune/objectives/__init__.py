"""What the loop minimises, per task: sums of losses and the counts they sum over.

output.py          Output (loss sum, count, metric sums) and the Objective protocol
logits.py          the one batch -> model -> logits adapter
regression.py      mse | mse_half | huber
classification.py  cross_entropy | bce
causal_lm.py       next-token cross-entropy (labels shifted or not)
losses.py          the formulas, written out
"""
