"""Data for the tools: ImageNet-style folders through timm, and the embedded procedurally generated "shapes"
dataset that lets every tool run with no download."""
from .folder import class_names, image_folder
from .shapes import CLASSES, ShapesSpec, make_shapes_dataset, render

__all__ = ["CLASSES", "ShapesSpec", "class_names", "image_folder", "make_shapes_dataset", "render"]
