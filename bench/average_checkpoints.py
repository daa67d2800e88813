"""Would an average of the generator's weights beat each checkpoint alone? Averages the
`generator.safetensors` of the given checkpoints of one run, samples as `dmd sample` does
(seed 0, classes i % 10; one-step students only: few-step ones would re-noise differently)
and measures as `dmd fid` does.

Usage: .venv/bin/python bench/average_checkpoints.py RUN/checkpoints/step-A [RUN/checkpoints/step-B ...]
           [--num 2000] [--ref fashion-mnist --features fashion]
"""

import argparse

import torch
from safetensors.torch import load_file

from dmdcli.evaluate import sample_tensors
from dmdcli.fid import fid_report
from dmdcli.pairs import pair_noise
from dmdcli.runs import load_student
from dmdcli.sampling import student_sample


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--ref", default="fashion-mnist")
    ap.add_argument("--features", default="fashion")
    a = ap.parse_args()
    recipe, teacher, generator, _ = load_student(a.checkpoints[0], device="cpu", ema=False)
    weights = [load_file(f"{c}/generator.safetensors") for c in a.checkpoints]
    generator.load_state_dict({k: sum(w[k].float() for w in weights) / len(weights) for k in weights[0]})
    idx = range(a.num)
    z, labels = pair_noise(0, idx, teacher.sample_shape), teacher.condition_ids(idx)
    with torch.no_grad():
        x = torch.cat([student_sample(generator, teacher.schedule, z[i:i + 500],
                                      teacher.encode_condition(labels[i:i + 500] if labels is not None else None),
                                      recipe.student.timesteps) for i in range(0, a.num, 500)])
    r = fid_report(sample_tensors(teacher.to_images(x), labels), a.ref, a.features, batch_size=500)
    num = lambda v: "-" if v is None else f"{v:.3f}"   # noqa: E731
    print(f"average of {len(weights)}: FID {r['fid']:.1f}  class accuracy {num(r.get('class_accuracy'))}  "
          f"within-class spread {num(r.get('within_class_spread'))}  ({a.num} samples)")


if __name__ == "__main__":
    main()
