"""Host syncs per training iteration, the way tests/test_syncs.py counts them: every .item(),
.tolist(), float(), int() or bool() of a tensor from dmdcli's code, per generator and critic turn
of the tiny GMM recipe with the GAN head. From a checkout's root (an older commit: a git
worktree of it, with PYTHONPATH=. so that its dmdcli is the one imported):

    OMP_NUM_THREADS=1 .venv/bin/python bench/count_syncs.py
"""
import pathlib
import sys
import tempfile

import torch

sys.path.insert(0, "tests")
from dmdcli.recipe import load_recipe
from dmdcli.trainer import DMDTrainer
from conftest import TINY
READS = ("item", "tolist", "__float__", "__int__", "__bool__")
calls = []
for name in READS:
    orig = getattr(torch.Tensor, name)
    def counted(self, *a, _o=orig):
        if "/dmdcli/" in sys._getframe(1).f_code.co_filename:
            calls.append(1)
        return _o(self, *a)
    setattr(torch.Tensor, name, counted)
d = pathlib.Path(tempfile.mkdtemp())
p = d / "t.toml"
p.write_text(TINY.format(out=d / "run", steps=40, checkpoint_every=20, method="dmd2") + "\n[gan]\ngenerator_weight = 3e-3\ncritic_weight = 1e-2\n")
tr = DMDTrainer(load_recipe(p))
gen, cri = [], []
for _ in range(12):
    turn = tr.is_generator_turn(); calls.clear(); tr.train_step()
    (gen if turn else cri).append(len(calls))
print("generator turn:", gen, "critic turn:", cri)
