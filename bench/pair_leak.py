"""Was a DMD v1 student measured on the noises it had been regressed on? Until sample noise got
its own stream (`generate.sample_noise`), sample i of seed s started from pair i's noise of
seed s, so the first N samples of `dmd sample --seed 0` were the noises of a run's N pairs
(made with the default seed 0). This measures one checkpoint both ways, each as `dmd fid`
measures: NUM samples from the pairs' noise stream (as `dmd sample` drew them before) and NUM
from the sample stream (as it draws them now). And it shows why they differ: how close the
student comes to the teacher's ODE output for the same noise, on CLOSE of its pairs (the
stored outputs) and on CLOSE fresh noises (the teacher's output made here with the pairs'
steps, sampler and guidance).

Usage: .venv/bin/python bench/pair_leak.py RUN_OR_CHECKPOINT PAIRS [--num 2000] [--close 256]
           [--ref fashion-mnist --features fashion]
"""

import argparse

import torch

from dmdcli.evaluation.samples import sample_tensors
from dmdcli.evaluation.fid import fid_report
from dmdcli.evaluation.generate import generator_tensors, sample_noise
from dmdcli.pairs import PairSet, pair_noise
from dmdcli.runs import load_student
from dmdcli.sampling import student_sample, teacher_ode


@torch.no_grad()
def student_on(generator, teacher, timesteps, z, idx):
    return student_sample(generator, teacher.schedule, z, teacher.encode_condition(teacher.condition_ids(idx)),
                          list(timesteps))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("pairs")
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--close", type=int, default=256)
    ap.add_argument("--ref", default="fashion-mnist")
    ap.add_argument("--features", default="fashion")
    a = ap.parse_args()
    recipe, teacher, generator, step = load_student(a.run, device="cpu")
    pairs = PairSet(a.pairs, teacher)
    m, ts, shape = pairs.manifest, recipe.student.timesteps, teacher.sample_shape
    rms = lambda x, y: float((x - y).pow(2).mean(dim=(1, 2, 3)).sqrt().mean())   # noqa: E731

    idx = range(min(a.close, len(pairs)))
    stored = pairs.rows(torch.tensor(list(idx)))
    on_pairs = rms(student_on(generator, teacher, ts, stored["noise"], idx), stored["output"])
    z = sample_noise(0, idx, shape)
    cond = teacher.encode_condition(teacher.condition_ids(idx))
    target = teacher_ode(teacher, z, cond, m["steps"], m["guidance"], m["sampler"])
    on_fresh = rms(student_on(generator, teacher, ts, z, idx), target)
    print(f"step {step}: RMS distance to the teacher's output for the same noise, {len(idx)} samples: "
          f"{on_pairs:.4f} on its pairs' noises, {on_fresh:.4f} on fresh ones ({on_fresh / on_pairs:.2f} times)")

    before = torch.cat([student_on(generator, teacher, ts, pair_noise(m["seed"], r, shape), r)
                        for r in (range(s, min(s + 500, a.num)) for s in range(0, a.num, 500))])
    streams = {"the pairs' noises (dmd sample before)": sample_tensors(before, teacher.condition_ids(range(a.num))),
               "the sample stream (dmd sample now)": generator_tensors(generator, teacher, ts, a.num, batch_size=500)}
    shared = min(a.num, len(pairs))
    print(f"{a.num} samples, of which {shared} start from a pair's noise in the first row:")
    for name, tensors in streams.items():
        r = fid_report(tensors, a.ref, a.features, batch_size=500)
        print(f"  {name}: FID {r['fid']:.1f}  class accuracy {r['class_accuracy']:.3f}  "
              f"within-class spread {r['within_class_spread']:.3f}")


if __name__ == "__main__":
    main()
