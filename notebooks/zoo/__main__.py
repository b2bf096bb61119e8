"""python -m notebooks.zoo EXERCISE --out port.safetensors: write an exercise's port trace (notebooks/zoo)."""

import argparse
import shlex

from . import EXERCISES, dump, exercise

parser = argparse.ArgumentParser(prog="python -m notebooks.zoo", description=__doc__)
parser.add_argument("exercise", choices=EXERCISES)
parser.add_argument("--out", required=True, help="the .safetensors trace to write")
args = parser.parse_args()
print(f"symptom: {exercise(args.exercise).SYMPTOM}")
model_dir, compare = dump(args.exercise, args.out)
print("now run:  jetmoe debug compare " + " ".join(shlex.quote(a) for a in compare))
