"""Any timm model (attnzoo's included) as an mmdetection / mmsegmentation backbone.

    backbone=dict(type='AttnzooBackbone', model_name='davit_tiny', out_indices=(0, 1, 2, 3),
                  drop_path_rate=0.2, frozen_stages=-1, with_cp=False,
                  init_cfg=dict(type='Pretrained', checkpoint='timm/davit_tiny.msft_in1k'))

The model is timm's ``features_only`` wrapper of ``model_name``; ``out_indices`` index its ``feature_info`` (timm's
numbering: for DaViT, L2ViT and RAVLT 0-3 are strides 4-32; for MaxViT, HaloNet and the ELA / ULSAM CNNs 0 is the
stride-2 stem and 1-4 are strides 4-32; for a plain ViT such as Sparsifiner, index i is block i, all at stride 16,
to be fed to :class:`attnzoo.det.necks.SimpleFPN`). ``out_channels`` and ``out_strides`` give what the neck receives.

``out_norm`` puts a LayerNorm on each output, as the L2ViT and RAVLT authors' detection backbones do (and Swin's),
with the eps of the family's authors (a family module's ``DET_OUT_NORM_EPS``: L2ViT's ``nn.LayerNorm`` 1e-5,
RAVLT's ``LayerNorm2d`` 1e-6, DaViT's ``nn.LayerNorm`` 1e-5; 1e-6 for the others);
``norm_eval`` keeps every BatchNorm in eval mode while training, as mmdet's ResNet does for the CNN families
(detection batches of 2 images per GPU are too small for batch statistics).

``init_cfg=dict(type='Pretrained', checkpoint=...)`` loads classification weights through timm, so each model's
``checkpoint_filter_fn`` converts them and the classifier is dropped. ``checkpoint`` is

* a local file: ``.safetensors``, or a ``.pth``/``.bin`` read with ``torch.load(weights_only=True)``;
* a Hugging Face Hub repository, ``hf-hub:ORG/NAME``;
* a timm pretrained tag of the same architecture: ``timm/davit_tiny.msft_in1k``, ``davit_tiny.msft_in1k``, or
  ``timm`` for the model's default tag;
* an authors' mmdetection / mmsegmentation checkpoint (a ``.pth`` whose ``state_dict`` has ``backbone.*`` keys,
  e.g. RAVLT's ``retinanet_t_1x_12_epoch.pth``): its backbone goes through the family's
  ``det_checkpoint_filter_fn`` (DaViT, L2ViT, RAVLT) and its output norms into ``out_norms``, so ``out_norm`` must
  match the file. Keys that do not fit raise an error naming them; levels past ``out_indices`` are dropped. A
  checkpoint of an attnzoo config (``backbone.model.*`` keys, any family) loads its backbone as it is.
  (:func:`attnzoo.det.checkpoint.convert_mm_checkpoint` converts the whole model, neck and heads included.)

Model arguments go through to ``timm.create_model``, e.g. ``window_padding='masked'`` for DaViT and L2ViT, whose
windows are by default padded as timm and the authors pad them (zero tokens attended to, what their detection
checkpoints were trained with); ``'masked'`` keeps the padding out of the keys.

Weights load in :meth:`init_weights` (which mmengine's Runner calls), so building a config never downloads.
"""
from __future__ import annotations

import os
import sys

import timm
import torch
from mmengine.model import BaseModule
from timm.layers import LayerNorm2d
from timm.models._features import FeatureGetterNet, _module_list
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..common import InputError
from ..hub import fit_report
from .checkpoint import read_mm_checkpoint
from .necks import SimpleFPN

__all__ = ["AttnzooBackbone"]


class AttnzooBackbone(BaseModule):
    """A timm model's multi-scale features for a detection or segmentation neck.

    Args:
        model_name: a timm model name, e.g. ``davit_tiny``, ``maxvit_tiny_tf_224``, ``halonet26t``.
        out_indices: which of the model's ``feature_info`` levels to return.
        drop_path_rate: stochastic depth rate of the model.
        frozen_stages: -1 trains everything; 0 freezes the stem; k >= 1 freezes the stem and the first k stages
            (the modules up to the stride-4 · 2^(k-1) feature; for a plain ViT the patch embedding, class token
            and position embedding, and the first k blocks).
        norm_eval: keep BatchNorm layers in eval mode (running statistics fixed) during training.
        out_norm: a LayerNorm over channels on each output feature map.
        with_cp: gradient checkpointing (timm's ``set_grad_checkpointing``), trading compute for memory.
        init_cfg: mmengine init config; ``dict(type='Pretrained', checkpoint=...)`` loads classification weights.
        **model_kwargs: passed to ``timm.create_model`` (e.g. ``img_size``).
    """

    def __init__(
        self,
        model_name: str,
        out_indices: tuple[int, ...] = (0, 1, 2, 3),
        drop_path_rate: float = 0.0,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        out_norm: bool = False,
        with_cp: bool = False,
        init_cfg: dict | None = None,
        **model_kwargs,
    ):
        super().__init__(init_cfg)
        if not timm.is_model(model_name):
            raise ValueError(f"AttnzooBackbone: `model_name`={model_name!r} is not a timm model; expected a name "
                             f"from timm.list_models() (import attnzoo first for attnzoo's models)")
        self.model_name = model_name
        self._model_kwargs = dict(features_only=True, out_indices=tuple(out_indices),
                                  drop_path_rate=drop_path_rate, **model_kwargs)
        try:
            self.model = timm.create_model(model_name, **self._model_kwargs)
        except IndexError as e:  # timm's message for an index past the last feature level is a bare IndexError
            raise ValueError(f"AttnzooBackbone({model_name}): `out_indices`={tuple(out_indices)} is out of range; "
                             f"{model_name} has feature levels 0..{self._num_levels() - 1}") from e
        info = self.model.feature_info
        self.out_channels = tuple(info.channels())
        self.out_strides = tuple(info.reduction())
        eps = getattr(self._family(), "DET_OUT_NORM_EPS", 1e-6)
        self.out_norms = nn.ModuleList(LayerNorm2d(c, eps=eps) for c in self.out_channels) if out_norm else None
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self._frozen = self._frozen_parts(frozen_stages)
        # timm's FeatureGetterNet (plain ViTs) does not forward set_grad_checkpointing to the model it wraps
        net = self.model.model if isinstance(self.model, FeatureGetterNet) else self.model
        net.set_grad_checkpointing(with_cp)
        self._freeze()

    def _family(self):
        """The module that registers ``model_name`` (its family's converters and constants)."""
        return sys.modules[timm.models.model_entrypoint(self.model_name).__module__]

    def _num_levels(self) -> int:
        return len(timm.create_model(self.model_name, features_only=True, pretrained=False).feature_info)

    def _frozen_parts(self, frozen_stages: int) -> list[nn.Module | nn.Parameter]:
        """The modules (and loose parameters) that run before the output of stage ``frozen_stages`` (stem = 0)."""
        if frozen_stages < 0:
            return []
        if isinstance(self.model, FeatureGetterNet):
            return self._vit_parts_before_block(frozen_stages)
        # feature levels at stride >= 4 are the stages; timm's features_only wrapper names its children after
        # the modules in feature_info with '.' -> '_'
        stages = [f["module"].replace(".", "_") for f in self.model.feature_info.info if f["reduction"] >= 4]
        if frozen_stages > len(stages):
            raise ValueError(f"AttnzooBackbone({self.model_name}): `frozen_stages`={frozen_stages} exceeds its "
                             f"{len(stages)} stages; expected -1..{len(stages)}")
        children = list(self.model.named_children())
        names = [n for n, _ in children]
        if frozen_stages == 0:
            end = names.index(stages[0])
        else:
            if stages[frozen_stages - 1] not in names:
                raise ValueError(f"AttnzooBackbone({self.model_name}): `frozen_stages`={frozen_stages} reaches past "
                                 f"the last stage kept by `out_indices`")
            end = names.index(stages[frozen_stages - 1]) + 1
        return [m for _, m in children[:end]]

    def _vit_parts_before_block(self, frozen_stages: int) -> list[nn.Module | nn.Parameter]:
        vit = self.model.model
        if frozen_stages > len(vit.blocks):
            raise ValueError(f"AttnzooBackbone({self.model_name}): `frozen_stages`={frozen_stages} exceeds its "
                             f"{len(vit.blocks)} blocks; expected -1..{len(vit.blocks)}")
        embeddings = [p for p in (vit.cls_token, vit.reg_token, vit.pos_embed) if p is not None]
        return [vit.patch_embed, *embeddings, *vit.blocks[:frozen_stages]]

    def _freeze(self) -> None:
        for part in self._frozen:
            if isinstance(part, nn.Parameter):
                part.requires_grad = False
                continue
            part.eval()
            for p in part.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze()  # frozen stages keep their normalisation statistics
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def init_weights(self) -> None:
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get("type") == "Pretrained":
            self.load_pretrained(cfg["checkpoint"])
            self._is_init = True
        else:
            super().init_weights()

    def load_pretrained(self, checkpoint: str) -> None:
        """Load classification weights, or the backbone of an mmdet/mmseg checkpoint (see the module docstring for
        what ``checkpoint`` may be)."""
        mm_state_dict = read_mm_checkpoint(checkpoint) if os.path.isfile(checkpoint) else None
        if mm_state_dict is not None:
            self.load_state_dict(self.convert_mm_backbone(mm_state_dict, checkpoint))
            return
        name, overlay = self._source(checkpoint)
        source = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **self._model_kwargs)
        self.model.load_state_dict(source.state_dict())

    def convert_mm_backbone(self, state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """This module's state_dict from the ``backbone.*`` weights of an mmdet/mmseg ``state_dict`` (read from
        ``source``): an authors' checkpoint through the family's ``det_checkpoint_filter_fn`` (the model's weights,
        and their output norms as ``out_norms``), or one of attnzoo's own configs as it is. An
        :class:`~attnzoo.hub.InputError` (a ValueError) names the keys that do not fit."""
        name = f"AttnzooBackbone({self.model_name})"
        backbone = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
        if any(k.startswith("model.") for k in backbone):  # trained with attnzoo's configs: our names
            out, unexpected = backbone, []
            norms = [k for k in backbone if k.startswith("out_norms.")]
        else:
            out, unexpected, norms = self._from_authors_layout(backbone, source)
        if norms and self.out_norms is None:
            raise InputError(f"{name}: {source} has output norms ({', '.join(norms[:4])}, ...), which "
                             f"out_norm=False leaves out; build the backbone with out_norm=True")
        # the unexpected keys of an authors' file are reported with the converter's names (the timm model's)
        report = fit_report(self.state_dict(), {**out, **{k: None for k in unexpected}})
        if report:
            raise InputError(f"{name}: the backbone of {source} does not fit:{report}")
        return out

    def _from_authors_layout(self, backbone: dict[str, torch.Tensor], source: str):
        """(our state_dict, the keys the model does not have, the output norms' keys) of an authors' backbone."""
        name, family = f"AttnzooBackbone({self.model_name})", self._family().__name__
        convert = getattr(self._family(), "det_checkpoint_filter_fn", None)
        if convert is None:
            raise InputError(f"{name}: {source} is an mmdet/mmseg checkpoint, but the {family} family has no "
                             f"converter of its authors' detection layout (det_checkpoint_filter_fn)")
        # the whole model, without weights, for the converter and for the names of its parts
        with torch.device("meta"):
            full = timm.create_model(self.model_name, **{k: v for k, v in self._model_kwargs.items()
                                                         if k not in ("features_only", "out_indices")})
        try:
            converted = convert(backbone, full)
        except (KeyError, IndexError, ValueError) as e:  # a key the converter has no rule for
            raise InputError(f"{name}: the backbone of {source} is not in the layout of the {family} authors' "
                             f"detection backbone ({type(e).__name__}: {e})") from None
        full_keys = set(full.state_dict())
        # timm's features_only wrapper keeps the model's children up to the last level, a Sequential's children
        # flattened into it as 'stages_0' (the names timm's FeatureListNet gives them)
        parts = {old: new for flatten in (False, True) for new, old, _ in _module_list(full, flatten)}
        kept = dict(self.model.named_children())
        prefixes = sorted(((old, new) for old, new in parts.items() if new in kept), key=lambda p: -len(p[0]))
        levels = list(self.model.feature_info.out_indices)
        out, unexpected, norms = {}, [], []
        for key, value in converted.items():
            if key.startswith("out_norms."):
                norms.append(key)
                _, level, param = key.split(".", 2)
                if int(level) in levels:  # the authors' norm of a level this backbone does not return is unused
                    out[f"out_norms.{levels.index(int(level))}.{param}"] = value
            elif key in full_keys:  # a part past the last level kept, or the head, is unused
                old = next((old for old, _ in prefixes if key.startswith(old + ".")), None)
                if old is not None:
                    out[f"model.{parts[old]}{key[len(old):]}"] = value
            else:
                unexpected.append(key)
        return out, unexpected, norms

    def _source(self, checkpoint: str) -> tuple[str, dict]:
        """(timm model name, pretrained_cfg overlay) that make timm load ``checkpoint``."""
        if os.path.isfile(checkpoint):
            return self.model_name, dict(file=os.path.abspath(checkpoint))
        if checkpoint.startswith("hf-hub:"):
            return self.model_name, dict(source="hf-hub", hf_hub_id=checkpoint.removeprefix("hf-hub:"))
        arch = timm.models.get_arch_name(self.model_name)
        name = checkpoint.removeprefix("timm/")
        if name == "timm":
            name = self.model_name
        if timm.models.get_arch_name(name) != arch or timm.models.get_pretrained_cfg(name) is None:
            raise ValueError(
                f"AttnzooBackbone({self.model_name}): init_cfg checkpoint={checkpoint!r} is neither an existing "
                f"file nor 'hf-hub:ORG/NAME' nor a timm pretrained tag of {arch}; expected e.g. one of "
                f"{timm.list_pretrained(arch + '.*') or ['a file path']}"
            )
        return name, {}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.model(x)
        if self.out_norms is not None:
            features = [norm(f) for norm, f in zip(self.out_norms, features, strict=True)]
        return tuple(features)


def register(*registries) -> None:
    """Register attnzoo's detection modules (:class:`AttnzooBackbone`, :class:`~attnzoo.det.necks.SimpleFPN`)."""
    for registry in registries:
        registry.register_module(module=AttnzooBackbone, force=True)
        registry.register_module(module=SimpleFPN, force=True)
