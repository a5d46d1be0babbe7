"""Data for the tools: ImageNet-style folders through timm, and the embedded procedurally generated "shapes"
dataset that lets every tool run with no download."""
from .folder import Readable, StrictImageDataset, class_names, collate_readable, image_folder
from .shapes import CLASSES, ShapesSpec, make_shapes_dataset, render

__all__ = ["CLASSES", "Readable", "ShapesSpec", "StrictImageDataset", "class_names", "collate_readable",
           "image_folder", "make_shapes_dataset", "render"]
