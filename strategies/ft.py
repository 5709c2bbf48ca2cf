"""FT: plain cross-entropy fine-tuning of encoder and current head; it adds no plugin.

LP-FT is FT whose head is first fitted by logistic regression on the frozen encoder's
features (`lpft` forces train.head_init = lp). With the default train.head_init = lp, FT and
LP-FT coincide; set head_init: zero for FT from an untrained head.
"""
