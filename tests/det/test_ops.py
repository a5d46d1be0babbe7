"""attnzoo.det.ops, the stand-in for mmcv's compiled ops, against references written from each op's definition,
called through mmcv.ops as mmdet calls them."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("mmdet", reason="the det extra is not installed")

from attnzoo.det import ops  # noqa: E402

pytestmark = pytest.mark.skipif(not ops.installed(), reason="the real mmcv ops are installed; nothing stands in")


def iou(a: torch.Tensor, b: torch.Tensor, offset: int = 0) -> torch.Tensor:
    w = (torch.min(a[2], b[2]) - torch.max(a[0], b[0]) + offset).clamp(min=0)
    h = (torch.min(a[3], b[3]) - torch.max(a[1], b[1]) + offset).clamp(min=0)
    area = lambda r: (r[2] - r[0] + offset) * (r[3] - r[1] + offset)
    return w * h / (area(a) + area(b) - w * h)


def nms_reference(boxes, scores, thr, offset=0):
    """Greedy NMS: take the best remaining box, drop every box overlapping it by more than thr, repeat."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i].item())
    keep = []
    for i in order:
        if all(iou(boxes[i], boxes[j], offset) <= thr for j in keep):
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


def random_boxes(n, generator, size=64.0):
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * size / 3 + 1
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("offset", [0, 1])
def test_nms_matches_greedy_definition(offset):
    from mmcv.ops import nms

    g = torch.Generator().manual_seed(offset)
    boxes, scores = random_boxes(60, g), torch.rand(60, generator=g)
    dets, keep = nms(boxes, scores, 0.4, offset=offset)
    expected = nms_reference(boxes, scores, 0.4, offset)
    assert torch.equal(keep, expected)
    assert torch.equal(dets[:, 4], scores[expected])


def test_batched_nms_keeps_classes_apart():
    from mmcv.ops import batched_nms

    g = torch.Generator().manual_seed(0)
    boxes, scores = random_boxes(40, g), torch.rand(40, generator=g)
    labels = torch.randint(0, 3, (40,), generator=g)
    _, keep = batched_nms(boxes, scores, labels, dict(type="nms", iou_threshold=0.3))
    expected = []
    for c in range(3):
        idx = (labels == c).nonzero().flatten()
        expected += idx[nms_reference(boxes[idx], scores[idx], 0.3)].tolist()
    assert sorted(keep.tolist()) == sorted(expected)
    assert torch.all(scores[keep][:-1] >= scores[keep][1:])  # by decreasing score


def bilinear(feat, y, x):
    """Bilinear interpolation of feat [C, H, W] at (y, x); 0 outside [-1, H] x [-1, W], clamped inside."""
    C, H, W = feat.shape
    if y < -1 or y > H or x < -1 or x > W:
        return feat.new_zeros(C)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = min(int(y), H - 1), min(int(x), W - 1)
    y1, x1 = min(y0 + 1, H - 1), min(x0 + 1, W - 1)
    y, x = (float(y0) if y0 == H - 1 else y), (float(x0) if x0 == W - 1 else x)
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * feat[:, y0, x0] + (1 - ly) * lx * feat[:, y0, x1]
            + ly * (1 - lx) * feat[:, y1, x0] + ly * lx * feat[:, y1, x1])


def roi_align_reference(feat, rois, out, scale, ratio, aligned):
    """RoIAlign (He et al. 2017): split each RoI into out x out bins, average ratio x ratio bilinear samples per
    bin (ratio 0: ceil(bin size) samples); ``aligned`` shifts pixel centres by -0.5."""
    result = feat.new_zeros(len(rois), feat.shape[1], out, out)
    shift = 0.5 if aligned else 0.0
    for r, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        x1, y1, x2, y2 = (v * scale - shift for v in (x1, y1, x2, y2))
        w, h = x2 - x1, y2 - y1
        if not aligned:
            w, h = max(w, 1.0), max(h, 1.0)
        bw, bh = w / out, h / out
        ny = ratio or int(torch.tensor(bh).ceil())
        nx = ratio or int(torch.tensor(bw).ceil())
        for i in range(out):
            for j in range(out):
                acc = 0
                for sy in range(ny):
                    for sx in range(nx):
                        y = y1 + i * bh + (sy + 0.5) * bh / ny
                        x = x1 + j * bw + (sx + 0.5) * bw / nx
                        acc = acc + bilinear(feat[int(b)], y, x)
                result[r, :, i, j] = acc / max(ny * nx, 1)
    return result


@pytest.mark.parametrize("aligned,ratio", [(True, 0), (True, 2), (False, 0), (False, 2)])
def test_roi_align_forward_backward_match_definition(aligned, ratio):
    from mmcv.ops import roi_align

    g = torch.Generator().manual_seed(1)
    feat = torch.randn(2, 3, 12, 10, generator=g, dtype=torch.float64)
    rois = torch.tensor([[0, 1.0, 2.0, 30.0, 20.0], [1, 10.0, 5.0, 18.0, 40.0], [0, -4.0, -3.0, 8.0, 50.0]],
                        dtype=torch.float64)
    x = feat.clone().requires_grad_(True)
    out = roi_align(x, rois, (3, 3), 0.5, ratio, "avg", aligned)
    ref_x = feat.clone().requires_grad_(True)
    ref = roi_align_reference(ref_x, rois, 3, 0.5, ratio, aligned)
    torch.testing.assert_close(out, ref)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, ref_x.grad)


def test_sigmoid_focal_loss_matches_definition():
    from mmcv.ops import sigmoid_focal_loss

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(7, 4, generator=g, dtype=torch.float64) * 3
    target = torch.tensor([0, 3, 4, 2, 4, 1, 0])  # 4 = background
    x = logits.clone().requires_grad_(True)
    loss = sigmoid_focal_loss(x, target, 2.0, 0.25, None, "mean")
    # FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t), summed over classes, averaged over rows
    ref_x = logits.clone().requires_grad_(True)
    p = ref_x.sigmoid()
    onehot = torch.nn.functional.one_hot(target, 5)[:, :4].to(p.dtype)
    p_t = onehot * p + (1 - onehot) * (1 - p)
    alpha_t = onehot * 0.25 + (1 - onehot) * 0.75
    ref = (-alpha_t * (1 - p_t) ** 2 * p_t.log()).sum() / 7
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, ref_x.grad)


def test_missing_op_names_the_op_and_the_remedy():
    from mmcv.ops import DeformConv2d

    conv = DeformConv2d(4, 4, 3, padding=1)
    x, offset = torch.randn(1, 4, 6, 6), torch.zeros(1, 18, 6, 6)
    with pytest.raises(ops.MissingOpError, match=r"mmcv\._ext\.deform_conv_forward .*make mmcv-full"):
        conv(x, offset)


def test_unsupported_mode_is_named():
    from mmcv.ops import roi_align

    with pytest.raises(ops.MissingOpError, match="pool_mode='max'"):
        roi_align(torch.randn(1, 1, 4, 4), torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]]), 2, 1.0, 0, "max")


def test_stand_in_reports_no_full_mmcv():
    from mmengine.utils.dl_utils import mmcv_full_available

    assert ops.install()  # idempotent
    assert not mmcv_full_available()
