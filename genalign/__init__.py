"""genalign: align generative models with preference data.

Adapters turn batches into per-sample log-likelihood scores for the policy and the reference on shared
randomness; objectives (``genalign.objectives``) are pure functions of those scores; one training core
(``genalign.train``) moves the optimizer.
"""

__version__ = "0.1.0"
