"""``python -m attnzoo.data ROOT``: write the shapes dataset (ImageNet-style folders + COCO json) under ROOT."""
import argparse
from dataclasses import asdict

from .shapes import ShapesSpec, make_shapes_dataset

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("root")
for field, default in asdict(ShapesSpec()).items():
    parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=default)
args = vars(parser.parse_args())
print(make_shapes_dataset(args.pop("root"), ShapesSpec(**args)))
