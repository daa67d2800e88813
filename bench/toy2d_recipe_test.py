"""CI's toy2d recipe test (tests/test_toy2d.py: unequal weights 4,1,1,2,1,1,3,1, batch 128, 8,192
pairs) with extra overrides, optionally with the DM gradient flipped, printing its mode metrics
and whether the test's bounds hold (BENCHMARKS.md, the 25-mode grid's paragraph on weight 10).

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/toy2d_recipe_test.py [--flip-dm] [KEY=VALUE ...]
  e.g. bench/toy2d_recipe_test.py --flip-dm regression.weight=10
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_toy2d as T  # noqa: E402

from dmdcli import losses  # noqa: E402
from toy2d_shape import summary  # noqa: E402  (bench/, this script's folder)


def main():
    over = sys.argv[1:]
    if over[:1] == ["--flip-dm"]:
        real = losses.dm_gradient
        losses.dm_gradient = lambda x, x0_real, x0_fake: (lambda g, bad: (-g, bad))(*real(x, x0_real, x0_fake))
        over = over[1:]
    with tempfile.TemporaryDirectory() as d:
        m = T.train_and_measure(Path(d), [*T.QUARTER, "teacher.gmm.weights=[4,1,1,2,1,1,3,1]", *over])
    print(f"{sys.argv[1:]}: {summary(m)}  test passes: {T.passes_mode_test(m) and T.has_the_modes_shape(m)}")


if __name__ == "__main__":
    main()
