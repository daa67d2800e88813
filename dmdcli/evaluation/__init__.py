"""Evaluation: sample sets of a student or teacher (generate.py), sample files and metrics
(samples.py), FID/KID on clean-fid (fid.py) with the shipped Fashion-MNIST classifier
(fashion_classifier.py), `dmd compare` (compare.py) and pictures (plots.py)."""
