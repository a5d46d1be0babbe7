"""OAT: Object-Level Attention Transformer for gaze scanpath prediction (Fang, Yu, Zhang, van der Lans, Shi;
ECCV 2024, arXiv 2407.13335), ported from the authors' code (HKUST-NISL/oat_eccv24, ``src/model``).

A visual-search display is a ``rows`` x ``cols`` grid of N objects and a target. OAT predicts the sequence of
fixated objects::

    encoder tokens  = [appearance(crop_k) ; position(row_k, col_k, 0)]  k = 0..N-1, then the target token
                      [appearance(crop_target) ; position(row_t, col_t, 1)]
    decoder tokens  = BOS, then the fixated objects [appearance ; position(row, col, is_target)] + order code
    pointer logits  = (projected decoder output . projected encoder tokens) / sqrt(d_k), per head, mixed by a
                      Linear(heads, 1), with a PAD logit; pointing at the target token (index N) means "stop".

From the authors' code: the appearance encoder (``CNNEmbedding``: Conv5x5(3->16)-ReLU-MaxPool5,
Conv3x3(16->32)-ReLU-MaxPool3, Linear -> d_model/2) on crops in [0, 1]; the learned position table W fitted so that
cos(W_i, W_j) = exp(-(i-j)^2 / (2 sigma^2)), sigma = 2, plus the norm-equalising loss, divided by n(n-1), Adam lr
0.01 from a Gaussian init (``positionalEncodingLearned.py``) and the 3-D code concat(W[row], W[col], W[flag])
truncated to d_model/2, W[0]/W[1] doubling as the flag codes; the target token appended last with flag 1, the
decoder's fixations flagged 1 when they are the target; BOS = a blank (all-ones) crop at the shelf centre
(rows // 2, cols // 2); the 1-D sinusoidal order code with dropout on the decoder input only; post-norm
``nn.TransformerEncoder``/``Decoder`` (4 + 4 layers, d_model 512, 4 heads, FFN 512, dropout 0.1) with every weight
matrix xavier-uniform initialised; the pointer (``Cross_Attention``, CAVersion 3: 2 heads, d_k = 512, a zero PAD
column before the head mix); cross-entropy with ``ignore_index = PAD``; greedy decoding whose first step may not
stop, and multinomial sampling (``test_max``, ``test_expect``).

Our reading / changes: the crop encoder may also be any timm/attnzoo backbone (``timm.create_model(name,
num_classes=0)`` on all crops of the batch in one forward, normalised with the backbone's mean/std, projected to
d_model/2; its weights keep their own init); the CNN's linear layer is sized from the crop size instead of the
authors' fixed 1440 (150x93 crops); W's length is max(rows, cols, 2) and its width ceil(d_model/2 / 3), which gives
the authors' 14 x 86 table for the 6 x 14 Amazon grid at d_model 512; the fit is vectorised and seeded (the authors
loop over pairs for 10,000 steps); decoding is batched (sequences that stopped are padded) and runs to
``max_len`` or until every sequence stopped.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import Tensor, nn

from ..hub import create_model

__all__ = ["CNNEmbedding", "OAT", "PointerHead", "fit_position_table", "oat_loss", "position_code"]


# ------------------------------------------------------------------------------------------- spatial position code


@functools.lru_cache(maxsize=8)
def _fit_cached(length: int, width: int, sigma: float, steps: int, lr: float, tol: float, seed: int) -> Tensor:
    W = nn.Parameter(torch.randn(length, width, generator=torch.Generator().manual_seed(seed)))
    opt = torch.optim.Adam([W], lr=lr)
    idx = torch.arange(length, dtype=torch.float32)
    target = torch.exp(-((idx[:, None] - idx[None, :]) ** 2) / (2 * sigma**2))
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        Wn = F.normalize(W, dim=1)
        norms = W.norm(dim=1)
        error = Wn @ Wn.T - target
        if step % 50 == 0 and error.abs().max() < tol and norms.std() < tol * norms.mean():
            break
        # sum over pairs of (cos_ij - gauss_ij)^2 + the variance of the row norms, divided by n(n-1)
        loss = (error**2).sum() + ((norms - norms.mean()) ** 2).mean()
        (loss / max(length * (length - 1), 1)).backward()
        opt.step()
    return W.detach().clone()


def fit_position_table(length: int, width: int, sigma: float = 2.0, steps: int = 5000, lr: float = 0.01,
                       tol: float = 5e-3, seed: int = 0) -> Tensor:
    """The learned position table W (length, width) of OAT: rows whose cosine similarity decays as a Gaussian of
    their index distance, cos(W_i, W_j) ~ exp(-(i-j)^2 / (2 sigma^2)), with equal norms. Adam runs until every
    cosine is within ``tol`` of its target and the norms' spread is below ``tol`` of their mean (checked every 50
    steps), or ``steps``. Deterministic in ``seed``; results are cached per argument set."""
    if length < 1 or width < 1:
        raise ValueError(f"fit_position_table: length and width must be >= 1, got {length} and {width}")
    return _fit_cached(length, width, float(sigma), steps, lr, tol, seed).clone()


def position_code(table: Tensor, rows: Tensor, cols: Tensor, flags: Tensor, dim: int) -> Tensor:
    """The 3-D position code concat(W[row], W[col], W[flag])[..., :dim] (index tensors of any equal shape)."""
    return torch.cat([table[rows], table[cols], table[flags]], dim=-1)[..., :dim]


def sinusoid_table(length: int, dim: int) -> Tensor:
    """Transformer sine/cosine order code (length, dim): even channels sin, odd channels cos."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(-torch.arange(0, dim, 2, dtype=torch.float32) * math.log(10000.0) / dim)
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


# --------------------------------------------------------------------------------------------- appearance encoders


class CNNEmbedding(nn.Module):
    """The authors' small crop CNN: Conv5x5(3->16)-ReLU-MaxPool5, Conv3x3(16->32)-ReLU-MaxPool3, Linear."""

    def __init__(self, out_dim: int, crop_size: tuple[int, int]):
        super().__init__()
        h, w = (((s - 4) // 5 - 2) // 3 for s in crop_size)
        if h < 1 or w < 1:
            raise ValueError(f"CNNEmbedding: crop_size {tuple(crop_size)} is too small (at least 29 x 29)")
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 5), nn.ReLU(), nn.MaxPool2d(5), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(3),
            nn.Flatten(),
        )
        self.fc = nn.Linear(32 * h * w, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class BackboneEmbedding(nn.Module):
    """Any timm/attnzoo backbone on the crops: pooled features, projected to ``out_dim``."""

    def __init__(self, name: str, out_dim: int, pretrained: bool = False, **kwargs):
        super().__init__()
        # a ValueError (InputError) naming the model for an unknown name, bad kwargs or unavailable weights
        self.backbone = create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
        cfg = resolve_data_config(model=self.backbone)
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.proj = nn.Linear(self.backbone.num_features, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.backbone((x - self.mean) / self.std))


# ------------------------------------------------------------------------------------------------------ the model


class PointerHead(nn.Module):
    """Pointer logits over the encoder tokens plus a PAD logit: per head h,
    s_h = (D W_h^d + b)(E W_h^e + b)^T / sqrt(d_k), a zero PAD column appended, heads mixed by Linear(H, 1)."""

    def __init__(self, d_model: int, heads: int = 2, d_k: int | None = None):
        super().__init__()
        self.scale = (d_k or d_model) ** -0.5
        self.dec = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(heads))
        self.enc = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(heads))
        self.mix = nn.Linear(heads, 1) if heads > 1 else None

    def forward(self, decoded: Tensor, memory: Tensor) -> Tensor:
        """(B, T, D), (B, S, D) -> (B, T, S + 1)."""
        pairs = zip(self.dec, self.enc, strict=True)
        scores = torch.stack([dec(decoded) @ enc(memory).transpose(1, 2) for dec, enc in pairs], dim=-1) * self.scale
        scores = F.pad(scores, (0, 0, 0, 1))  # the PAD column, 0 in every head
        return scores.squeeze(-1) if self.mix is None else self.mix(scores).squeeze(-1)


class OAT(nn.Module):
    """Object-level attention transformer on a ``rows`` x ``cols`` grid (N = rows * cols objects).

    Output indices: 0..N-1 objects, N = stop (the target token), N + 1 = PAD.

    Args:
        rows, cols: the grid; object k sits at (k // cols, k % cols).
        crop_encoder: ``"cnn"`` (the authors' CNN) or a timm/attnzoo model name.
        crop_size: (height, width) of the crops (needed by the CNN).
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout: the transformer.
        pointer_heads, pointer_dk: the pointer's heads and its scaling d_k (default d_model).
        sigma: width of the position code's Gaussian.
        max_len: longest decoder input the order code covers.
        pretrained: load the crop backbone's pretrained weights.
    """

    def __init__(self, rows: int, cols: int, crop_encoder: str = "cnn", crop_size: tuple[int, int] = (150, 93),
                 d_model: int = 512, nhead: int = 4, num_encoder_layers: int = 4, num_decoder_layers: int = 4,
                 dim_feedforward: int = 512, dropout: float = 0.1, pointer_heads: int = 2,
                 pointer_dk: int | None = None, sigma: float = 2.0, max_len: int = 256, pretrained: bool = False):
        super().__init__()
        if rows < 1 or cols < 1:
            raise ValueError(f"OAT: rows and cols must be >= 1, got {rows} x {cols}")
        if d_model % 2 or d_model % nhead:
            raise ValueError(f"OAT: d_model {d_model} must be even and divisible by nhead {nhead}")
        self.rows, self.cols, self.num_objects = rows, cols, rows * cols
        self.stop_index, self.pad_index = self.num_objects, self.num_objects + 1
        self.max_len = max_len
        self.appearance_dim = d_model // 2
        self.position_dim = d_model - self.appearance_dim
        if crop_encoder == "cnn":
            self.crop_encoder: nn.Module = CNNEmbedding(self.appearance_dim, crop_size)
        else:
            self.crop_encoder = BackboneEmbedding(crop_encoder, self.appearance_dim, pretrained=pretrained)
        table = fit_position_table(max(rows, cols, 2), math.ceil(self.position_dim / 3), sigma)
        self.register_buffer("position_table", table)
        self.register_buffer("order_code", sinusoid_table(max_len + 1, d_model), persistent=False)
        self.order_dropout = nn.Dropout(dropout)
        layer = dict(d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer), num_encoder_layers,
                                             enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), num_decoder_layers)
        self.pointer = PointerHead(d_model, pointer_heads, pointer_dk)
        for name, p in self.named_parameters():
            if p.dim() > 1 and not name.startswith("crop_encoder.backbone."):
                nn.init.xavier_uniform_(p)

    # -- tokens

    def _check(self, crops: Tensor, target: Tensor) -> None:
        if crops.dim() != 5 or crops.shape[1] != self.num_objects or crops.shape[2] != 3:
            raise ValueError(f"OAT: crops must be (B, {self.num_objects}, 3, H, W) for the {self.rows} x {self.cols} "
                             f"grid, got {tuple(crops.shape)}")
        if target.shape != crops.shape[:1] or target.min() < 0 or target.max() >= self.num_objects:
            raise ValueError(f"OAT: target must be (B,) object indices in [0, {self.num_objects}), got "
                             f"{tuple(target.shape)} with values {target.tolist()}")

    def _position(self, index: Tensor, flag: Tensor) -> Tensor:
        return position_code(self.position_table, index // self.cols, index % self.cols, flag.long(),
                             self.position_dim)

    def encode(self, crops: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encoder memory (B, N + 1, D), the appearance of the objects (B, N, A) and of BOS (1, A)."""
        self._check(crops, target)
        B, N = crops.shape[:2]
        blank = crops.new_ones((1, *crops.shape[2:]))  # BOS's crop (the authors' all-ones padding image)
        appearance = self.crop_encoder(torch.cat([crops.flatten(0, 1), blank]))
        appearance, bos = appearance[:-1].view(B, N, -1), appearance[-1:]
        objects = torch.arange(N, device=crops.device).expand(B, N)
        source = torch.cat([objects, target[:, None]], dim=1)
        flags = torch.zeros_like(source)
        flags[:, -1] = 1
        tokens = torch.cat([appearance.gather(1, source[..., None].expand(-1, -1, appearance.shape[-1])),
                            self._position(source, flags)], dim=-1)
        return self.encoder(tokens), appearance, bos

    def decode(self, memory: Tensor, appearance: Tensor, bos: Tensor, target: Tensor, fixations: Tensor) -> Tensor:
        """Pointer logits (B, L + 1, N + 2) after BOS and each of ``fixations`` (B, L), padded with -1."""
        B, L = fixations.shape
        if L + 1 > self.order_code.shape[0]:
            raise ValueError(f"OAT: {L} fixations exceed max_len {self.max_len}")
        if fixations.numel() and (fixations.min() < -1 or fixations.max() >= self.num_objects):
            raise ValueError(f"OAT: fixations must be object indices in [0, {self.num_objects}) or -1 (padding)")
        pad = fixations < 0
        index = fixations.clamp(min=0)
        fixated = appearance.gather(1, index[..., None].expand(-1, -1, appearance.shape[-1]))
        tokens = torch.cat([fixated, self._position(index, index == target[:, None])], dim=-1)
        centre = torch.tensor((self.rows // 2) * self.cols + self.cols // 2, device=fixations.device)
        start = torch.cat([bos, self._position(centre, torch.zeros_like(centre))[None]], dim=-1)
        tokens = torch.cat([start.expand(B, 1, -1), tokens], dim=1)
        tokens = self.order_dropout(tokens + self.order_code[: L + 1])
        causal = nn.Transformer.generate_square_subsequent_mask(L + 1, device=tokens.device, dtype=torch.bool)
        key_pad = F.pad(pad, (1, 0))
        decoded = self.decoder(tokens, memory, tgt_mask=causal, tgt_key_padding_mask=key_pad, tgt_is_causal=True)
        return self.pointer(decoded, memory)

    def forward(self, crops: Tensor, target: Tensor, fixations: Tensor) -> Tensor:
        """Teacher-forced logits (B, L + 1, N + 2): step t scores the (t+1)-th fixation, the step after the last
        fixation should point at the stop index N."""
        memory, appearance, bos = self.encode(crops, target)
        return self.decode(memory, appearance, bos, target, fixations)

    @torch.no_grad()
    def generate(self, crops: Tensor, target: Tensor, max_len: int | None = None, sample: bool = False,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Batched decoding, greedy or multinomial. Returns the fixations (B, max_len), -1 after a sequence
        stopped (the stop itself is not included), and whether each sequence stopped (B,). The first step may not
        stop (the authors' rule)."""
        max_len = max_len or self.max_len
        memory, appearance, bos = self.encode(crops, target)
        B = crops.shape[0]
        out = crops.new_full((B, 0), -1, dtype=torch.long)
        stopped = torch.zeros(B, dtype=torch.bool, device=crops.device)
        for step in range(max_len):
            logits = self.decode(memory, appearance, bos, target, out)[:, -1, : self.pad_index].float()
            if step == 0:
                logits[:, self.stop_index] = -math.inf
            if sample:
                choice = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
            else:
                choice = logits.argmax(-1)
            stopped |= choice == self.stop_index
            out = torch.cat([out, torch.where(stopped, -1, choice)[:, None]], dim=1)
            if stopped.all():
                break
        return F.pad(out, (0, max_len - out.shape[1]), value=-1), stopped


def oat_loss(logits: Tensor, fixations: Tensor, stop_index: int) -> Tensor:
    """Teacher-forced cross-entropy: each step's target is the next fixation, then ``stop_index`` after the last;
    padding (``stop_index + 1``) is ignored, as the authors' ``CrossEntropyLoss(ignore_index=PAD)``."""
    pad_index = stop_index + 1
    lengths = (fixations >= 0).sum(1)
    targets = F.pad(fixations.masked_fill(fixations < 0, pad_index), (0, 1), value=pad_index)
    targets.scatter_(1, lengths[:, None], stop_index)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=pad_index)
