"""Would an average of the generator's weights beat each checkpoint alone? Averages the
`generator.safetensors` of the given checkpoints of one run, samples as `dmd sample` does
(seed 0, classes i % 10) and measures as `dmd fid` does.

Usage: .venv/bin/python bench/average_checkpoints.py RUN/checkpoints/step-A [RUN/checkpoints/step-B ...]
           [--num 2000] [--ref fashion-mnist --features fashion] [--ema]
"""

import argparse

from safetensors.torch import load_file

from dmdcli.evaluation.fid import fid_report
from dmdcli.evaluation.generate import generator_tensors
from dmdcli.runs import load_student


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--ref", default="fashion-mnist")
    ap.add_argument("--features", default="fashion")
    ap.add_argument("--ema", action="store_true", help="average the EMA weights (generator_ema.safetensors)")
    a = ap.parse_args()
    recipe, teacher, generator, _ = load_student(a.checkpoints[0], device="cpu", ema=False)
    weights = [load_file(f"{c}/generator{'_ema' if a.ema else ''}.safetensors") for c in a.checkpoints]
    generator.load_state_dict({k: sum(w[k].float() for w in weights) / len(weights) for k in weights[0]})
    r = fid_report(generator_tensors(generator, teacher, recipe.student.timesteps, a.num, batch_size=500,
                                   precision=recipe.train.mixed_precision),
                   a.ref, a.features, batch_size=500)
    num = lambda v: "-" if v is None else f"{v:.3f}"   # noqa: E731
    print(f"average of {len(weights)}: FID {r['fid']:.1f}  class accuracy {num(r.get('class_accuracy'))}  "
          f"within-class spread {num(r.get('within_class_spread'))}  ({a.num} samples)")


if __name__ == "__main__":
    main()
