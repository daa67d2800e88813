"""Plumbing every command shares: user errors (errors.py), atomic writes and locks (io.py),
pickle-free checkpoints (checkpoint.py), this process's place under `accelerate launch`
(processes.py), progress bars (progress.py) and clean stops on signals (stopping.py)."""
