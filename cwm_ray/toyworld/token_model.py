"""The toy token world model (`WorldModelConfig(backend="token", model="toy")`, `build_toy_token_world_model`):
the token backend's classes with tiny configs, a 4-layer Llama and a VQ-VAE with one token per 8-pixel toy cell
(64 tokens at 64 px). A VQ-VAE learns its codebook in a training of its own, so the toy's VQ is *constructed*,
not trained, and frozen:
- encoder: the conv stack is set to a linear patch codec (2×2 average pooling, then space-to-depth), so a
  token's pre-quantization feature is its cell's 4×4 grid of pooled colours minus the background, plus one
  constant channel (`_TOY_PAD`). Residual branches and attention outputs are zero (identities), and the
  GroupNorm before `conv_out` is made a fixed scale by filler channels that dominate each group's variance.
- codebook: the features of the toy palette (background, and each shape × colour), so a still toy frame
  tokenizes exactly, and the squared feature distance of two tokens is their pooled-pixel distance.
- decoder: draws each code as its palette cell, pixel-exact (`_construct_toy_decoder`): a ReLU unit per
  code reads its shape and colour off the entry, the zero padding at the image's edges gives each pixel
  its offset inside its token (a VQGAN decoder is otherwise translation-invariant), and the last res
  block turns offset + shape into the cell's mask. So tokenize → decode reproduces a still toy frame, and
  sampled toy images can be judged like the diffusion backend's.

It lives beside the toy world, not in `cwm_ray.world_model.token`, so the product's backend carries no toy: the
backend builds it by name through `cwm_ray.builtin_models` (`components_from_config`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import JanusConfig, JanusForConditionalGeneration, LlamaConfig

from cwm_ray.config import TOY, ToyWorldConfig, WorldModelConfig
from cwm_ray.toyworld.render import render, shape_mask
from cwm_ray.toyworld.tokenizer import build_word_tokenizer
from cwm_ray.toyworld.world import BACKGROUND, COLORS, SHAPES, Obj, Scene
from cwm_ray.world_model.token import BOI, EOI, IMAGE, TokenWorldModel

_TOY_CELL = 8
"""Pixels per token side: the toy world's 8-pixel cells at 64 px (three 2× downsamplings)."""
_TOY_FILL = 1e4
"""Filler channel magnitude: dominates each GroupNorm group's variance, so the norm is a fixed scale."""
_TOY_DECODER_FILL = 1024.0
"""The decoder's filler: smaller, since torch's running GroupNorm mean errs by ~F·1e-7 per step, and the
decoder needs its values to 1e-4 (at 1e4 the error reached 1e-3 at odd sizes); its content stays ≤ 8, so
the std still moves by < 3e-5."""
_TOY_PAD = 100.0
"""Constant feature channel: with it, cosine nearest code ≈ L2 nearest, and the decoder's normalised
codebook entries keep their scale to 1e-3 (an entry is [a, PAD] / |[a, PAD]| with |a|² ≲ 40)."""
_TOY_SWISH = 20.0
"""Offset that puts SiLU in its linear range (sigmoid(20 ± 2) = 1 − 1e-8; the decoder's values stay ≲ 8)."""


def _toy_vq_config(resolution: int, hidden: int) -> dict[str, Any]:
    pooled = 3 * (_TOY_CELL // 2) ** 2  # the 4×4 pooled colours of a cell
    return {"embed_dim": pooled + 1, "latent_channels": pooled, "base_channels": 128,
            "channel_multiplier": [1, 1, 1, 1], "num_res_blocks": 0, "projection_dim": hidden,
            "image_token_embed_dim": hidden, "num_hidden_layers": 2}


def _kinds() -> list[tuple[str, str]]:
    """(shape, colour) of codes 1, 2, ...: the codebook's order (code 0 is the background)."""
    return [(s, c) for c in COLORS for s in SHAPES]


def _palette(resolution: int) -> list[np.ndarray]:
    """Toy frames holding every cell kind once: the background cell first, then each shape × colour."""
    grid = resolution // _TOY_CELL
    world = ToyWorldConfig(image_size=resolution, grid=grid)
    kinds = _kinds()
    per = grid * grid - 1  # cell 0 stays background
    frames = []
    for start in range(0, len(kinds), per):
        objs = [Obj(s, c, (k + 1) // grid, (k + 1) % grid) for k, (s, c) in enumerate(kinds[start:start + per])]
        frames.append(render(Scene(tuple(objs)), world))
    return frames


@torch.no_grad()
def _construct_toy_vq(vq: nn.Module, resolution: int) -> None:
    """Set the toy VQ-VAE's weights to the patch codec of the module docstring (everything else zero)."""
    for p in vq.parameters():
        p.zero_()
    enc = vq.encoder
    bg = torch.tensor(BACKGROUND, dtype=torch.float32) / 127.5 - 1.0
    fill, pad, swish = _TOY_FILL, _TOY_PAD, _TOY_SWISH
    sigma = fill / math.sqrt(2.0)  # std of a group [x, y, F, −(x+y+F)] when F dominates
    c = enc.conv_in.out_channels
    groups = c // 4
    pooled = vq.config.latent_channels
    for ch in range(3):  # conv_in: the pixels into channels 0–2
        enc.conv_in.weight[ch, ch, 1, 1] = 1.0
    down = [enc.down[i].downsample.conv for i in range(3)]
    for ch in range(3):  # 2×2 average pooling (taps 0–1: the block, given the right/bottom padding)
        down[0].weight[ch, ch, :2, :2] = 0.25
    for dy in range(2):  # space-to-depth: 3 → 12 channels
        for dx in range(2):
            for ch in range(3):
                down[1].weight[3 * (2 * dy + dx) + ch, ch, dy, dx] = 1.0
    # space-to-depth 12 → 48, written straight into the GroupNorm layout [x, y, F, −(x+y+F)] per group
    for dy in range(2):
        for dx in range(2):
            for m in range(12):
                k = 12 * (2 * dy + dx) + m
                g, slot = divmod(k, 2)
                down[2].weight[4 * g + slot, m, dy, dx] = 1.0
                down[2].weight[4 * g + 3, m, dy, dx] = -1.0
    for g in range(groups):
        down[2].bias[4 * g + 2], down[2].bias[4 * g + 3] = fill, -fill
    content = [4 * (k // 2) + k % 2 for k in range(pooled)]
    enc.norm_out.weight.fill_(1.0)
    enc.norm_out.weight[content], enc.norm_out.bias[content] = sigma, swish
    for k, ch in enumerate(content):  # back out of the norm's offset and centre on the background colour
        enc.conv_out.weight[k, ch, 1, 1] = 1.0
        enc.conv_out.bias[k] = -swish - bg[k % 3]
    for k in range(pooled):
        vq.quant_conv.weight[k, k, 0, 0] = 1.0
    vq.quant_conv.bias[pooled] = pad

    # codebook: the palette's features, background first
    frames = torch.from_numpy(np.stack(_palette(resolution))).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    feats = vq.quant_conv(enc(frames)).flatten(2).transpose(1, 2)  # (frames, cells, C)
    per = feats.shape[1] - 1
    book = [feats[0, 0]] + [feats[f, 1 + i] for f in range(len(frames)) for i in range(per)]
    vq.quantize.embedding.weight.copy_(torch.stack(book[:vq.config.num_embeddings]))

    _construct_toy_decoder(vq, _kinds(), resolution // _TOY_CELL)


_TOY_TEXT_POSITIONS = 24
"""The toy's `text_positions` (its actions have ≤ 11 words): the fixed source → target offset let copying the
unchanged cells emerge by step 1000 of a 4000-step run (teacher-forced copy of unchanged objects 72 %), where
the text-length-dependent offset had 5 % (GPU sweep, same seed and data order)."""
_TOY_RELU = 200.0
"""Gain that makes SiLU a ReLU: SiLU(200·x) / 200 = max(x, 0) to 1e-9 for |x| ≥ 0.09 (the smallest colour step)."""
_TOY_MASK_GAIN = 3.0
"""Drives a colour channel below zero where the shape is off (colour steps are at most 1.66)."""


class _Slots:
    """Named content channels of a decoder feature map, laid out for GroupNorm as [x, −x, F, −F] per group.

    Each group of 4 channels (Janus: 32 groups) holds one value x with its negation and two filler channels
    ±F, so the group's mean is 0 and its std F/√2 to 3e-5 whatever x is: the norm is a fixed per-channel
    scale, and the decoder's nonlinear blocks become linear (SiLU offset) or ReLU (SiLU gain) at will.
    """

    def __init__(self, names: Sequence[str], channels: int) -> None:
        if 4 * len(names) > channels:
            raise ValueError(f"{len(names)} slots need {4 * len(names)} channels, the decoder has {channels}")
        self.index = {n: 4 * k for k, n in enumerate(names)}
        self.channels = channels

    def __getitem__(self, name: str) -> int:
        return self.index[name]

    def fill(self, conv: nn.Conv2d) -> None:
        """The ±F filler of every group, as the bias of the conv that writes this map."""
        for g in range(self.channels // 4):
            conv.bias[4 * g + 2], conv.bias[4 * g + 3] = _TOY_DECODER_FILL, -_TOY_DECODER_FILL

    def norm(self, norm: nn.GroupNorm, names: Sequence[str], gain: float = 1.0, offset: float = 0.0) -> None:
        """The GroupNorm after this map: `gain·x + offset` on the named slots, 0 (so SiLU gives 0) elsewhere."""
        norm.weight.zero_()
        norm.bias.zero_()
        self.scale(norm, names, gain, offset)

    def scale(self, norm: nn.GroupNorm, names: Sequence[str], gain: float = 1.0, offset: float = 0.0) -> None:
        """`gain·x + offset` on the named slots of a GroupNorm after this map, the others as they are."""
        for n in names:
            norm.weight[self[n]], norm.bias[self[n]] = gain * _TOY_DECODER_FILL / math.sqrt(2.0), offset


def _tap(conv: nn.Conv2d, out: int, inp: int, w: float, dy: int = 0, dx: int = 0) -> None:
    """Add `w · input[y + dy, x + dx]` to output slot `out` and its negation to `out + 1`."""
    k = conv.kernel_size[0] // 2
    conv.weight[out, inp, k + dy, k + dx] += w
    conv.weight[out + 1, inp, k + dy, k + dx] -= w


def _bias(conv: nn.Conv2d, out: int, b: float) -> None:
    conv.bias[out] += b
    conv.bias[out + 1] -= b


def _read(conv: nn.Conv2d, out: int, inp: int, one: int, w: float, dy: int = 0, dx: int = 0) -> None:
    """`_tap` of a map that passed a linear-range SiLU (x + offset inside the image, 0 in the padding).

    The offset is cancelled through the constant slot `one` (1 + offset inside, 0 in the padding), so a
    tap outside the image reads 0, as on a raw map.
    """
    _tap(conv, out, inp, w, dy, dx)
    _tap(conv, out, one, -w * _TOY_SWISH / (1.0 + _TOY_SWISH), dy, dx)


def _integer_basis(values: Sequence[float], n: int) -> tuple[float, np.ndarray]:
    """(a, b) with a + Σ_m b[m]·max(t − m, 0) = values[t] for t = 0..n−1: any function of a cell coordinate."""
    t = np.arange(n, dtype=np.float64)
    basis = np.column_stack([np.ones(n)] + [np.maximum(t - m, 0.0) for m in range(n - 1)])
    coef = np.linalg.solve(basis, np.asarray(values, dtype=np.float64))
    return float(coef[0]), coef[1:]


def _exposing_unit(points: np.ndarray, k: int, iters: int = 500) -> tuple[np.ndarray, float]:
    """(w, b) with w·points[k] + b = 1 and w·points[j] + b ≤ −1 for every other j: a ReLU that flags point k.

    w is the minimum-norm point of the convex hull of {points[k] − points[j]} (Frank–Wolfe, exact line
    search): the hard-margin direction separating point k from the rest, which exists when point k is a
    vertex of the set's hull (every toy code is: margins ≥ 0.28 against ~1e-6 of float32 noise).
    """
    diffs = points[k] - np.delete(points, k, axis=0)
    x = diffs.mean(axis=0)
    for _ in range(iters):
        d = diffs[np.argmin(diffs @ x)] - x
        if (dd := float(d @ d)) == 0.0:
            break
        x = x + min(max(-float(x @ d) / dd, 0.0), 1.0) * d
    top, rest = float(points[k] @ x), float(np.max(np.delete(points, k, axis=0) @ x))
    if top - rest < 1e-3 * float(np.linalg.norm(x)):
        raise ValueError(f"toy code {k} is not separable from the others by one ReLU")
    scale = 2.0 / (top - rest)  # 1 at point k, −1 at the nearest other
    return x * scale, 1.0 - top * scale


@torch.no_grad()
def _construct_toy_decoder(vq: nn.Module, kinds: Sequence[tuple[str, str]], grid: int) -> None:
    """Set the VQ decoder to draw each code as its palette cell: the shape in its colour, pixel-exact.

    The entries are shape ⊗ colour (pooled colours), so no linear map reads the code off them: the first
    mid block has one ReLU unit per code (`_exposing_unit`) and writes the code's shape flags and colour
    step into the map. A VQGAN decoder is nearest upsampling + convolutions, translation-invariant, so it
    cannot know where inside its token a pixel lies without knowing where the token is. The zero padding
    at the image's edges is the one thing that does: seven left/up-looking convolutions at token
    resolution count the tokens to the edge (a ramp 1..grid, hence grid ≤ 8), and each upsampling conv
    keeps it a ramp (R(X) + R(X − 1) = X + 1 after nearest upsampling), so at full resolution a pixel's
    offset in its cell is linear in the maps. The last res block turns offsets into the cell's shape mask
    with two ReLU layers (one AND of a row set, a column set and the code's shape per distinct mask row),
    and the output conv adds the code's colour under the mask to the background. All blocks are made
    linear or ReLU by the `_Slots` layout; attention outputs stay zero.
    """
    if grid > 8:
        raise ValueError(f"the toy VQ decoder counts at most 8 tokens to the edge; got a {grid}×{grid} grid")
    dec, cell = vq.decoder, _TOY_CELL
    width = dec.conv_in.out_channels
    bg = np.asarray(BACKGROUND, np.float64) / 127.5 - 1.0
    shapes, colours = [f"shape_{s}" for s in SHAPES], ["dp0", "dp1", "dp2", "dm0", "dm1", "dm2"]

    # per-code descriptors: the shape flags and the colour's step from the background, split by sign
    carried = [*shapes, *colours]
    book = F.normalize(vq.quantize.embedding.weight.detach().double(), dim=-1).numpy()[: len(kinds) + 1]
    descriptors = np.zeros((len(book), len(carried)))  # code 0 is the background: all zero
    for k, (shape, colour) in enumerate(kinds, start=1):
        descriptors[k, SHAPES.index(shape)] = 1.0
        delta = np.asarray(COLORS[colour], np.float64) / 127.5 - 1.0 - bg
        descriptors[k, 4:7], descriptors[k, 7:10] = np.maximum(delta, 0), np.maximum(-delta, 0)
    # post_quant_conv: the entries' pooled colours (× PAD, so O(1)) on their principal axes. The entries
    # are shape ⊗ colour, so no linear map gives the descriptors: a ReLU unit per code does (below).
    pooled = book[:, :-1] * _TOY_PAD
    _, sv, axes = np.linalg.svd(pooled, full_matrices=False)
    axes = axes[sv > 1e-3 * sv[0]]
    latent = ["one", *[f"z{d}" for d in range(len(axes))]]
    vq.post_quant_conv.weight[1:len(latent), :-1, 0, 0] = torch.from_numpy(axes * _TOY_PAD).float()
    vq.post_quant_conv.bias[0] = 1.0  # "one": 1 on every token, 0 in conv_in's padding
    z = pooled @ axes.T
    units = [_exposing_unit(z, k) for k in range(1, len(book))]  # (w, b): w·z + b is 1 at code k, ≤ −1 elsewhere

    # token resolution: the constant, the left/up ramps s (accumulated) and v (the current shift)
    s8 = _Slots(["one", "sx", "vx", "sy", "vy", *latent[1:], *carried], width)
    conv = dec.conv_in
    for n in latent:
        _tap(conv, s8[n], latent.index(n), 1.0)
    for s, v, dy, dx in (("sx", "vx", 0, -1), ("sy", "vy", -1, 0)):
        _tap(conv, s8[v], 0, 1.0, dy, dx)
        _tap(conv, s8[s], 0, 1.0)
        _tap(conv, s8[s], 0, 1.0, dy, dx)
    s8.fill(conv)
    codes = [f"code{k}" for k in range(1, len(book))]
    hidden = _Slots(["one", "ax", "bx", "ay", "by", *codes], width)
    for block in (dec.mid.block_1, dec.mid.block_2, dec.up[0].block[0]):  # each adds two shifts to the ramps
        first = block is dec.mid.block_1
        s8.norm(block.norm1, ["one", "vx", "vy", *(latent[1:] if first else [])], offset=_TOY_SWISH)
        _read(block.conv1, hidden["one"], s8["one"], s8["one"], 1.0)
        for a, b, v, dy, dx in (("ax", "bx", "vx", 0, -1), ("ay", "by", "vy", -1, 0)):
            _read(block.conv1, hidden[a], s8[v], s8["one"], 1.0, dy, dx)  # a = z·v
            _read(block.conv1, hidden[b], s8[v], s8["one"], 1.0)  # b = v
        hidden.fill(block.conv1)
        hidden.norm(block.norm2, ["one", "ax", "bx", "ay", "by"], offset=_TOY_SWISH)
        for a, b, s, v, dy, dx in (("ax", "bx", "sx", "vx", 0, -1), ("ay", "by", "sy", "vy", -1, 0)):
            _read(block.conv2, s8[s], hidden[a], hidden["one"], 1.0)  # s += z·a + z²·a
            _read(block.conv2, s8[s], hidden[a], hidden["one"], 1.0, dy, dx)
            _read(block.conv2, s8[v], hidden[a], hidden["one"], 1.0, dy, dx)  # v ← z²·v
            _read(block.conv2, s8[v], hidden[b], hidden["one"], -1.0)
        if first:  # the code's ReLU unit, then its descriptors into the (zero) carried slots
            for unit, (w, b) in zip(codes, units, strict=True):
                for d, wd in enumerate(w):
                    _read(block.conv1, hidden[unit], s8[f"z{d}"], s8["one"], float(wd))
                _bias(block.conv1, hidden[unit], float(b))
            hidden.scale(block.norm2, codes, gain=_TOY_RELU)
            for k, unit in enumerate(codes, start=1):
                for n, value in zip(carried, descriptors[k], strict=True):
                    if value:
                        _tap(block.conv2, s8[n], hidden[unit], float(value) / _TOY_RELU)

    # upsampling: R(X) = R(X) + R(X − 1) on the nearest-upsampled map is X + 1 again; r is the token's ramp
    fine = _Slots(["Rx", "Ry", "rx", "ry", *carried], width)
    for level, source in ((0, s8), (1, fine)):
        conv = dec.up[level].upsample.conv
        ramp = {"Rx": "sx", "Ry": "sy"} if source is s8 else {"Rx": "Rx", "Ry": "Ry"}
        token = {"rx": "sx", "ry": "sy"} if source is s8 else {"rx": "rx", "ry": "ry"}
        for (out, inp), (dy, dx) in zip(ramp.items(), ((0, -1), (-1, 0)), strict=True):
            _tap(conv, fine[out], source[inp], 1.0)
            _tap(conv, fine[out], source[inp], 1.0, dy, dx)
        for out, inp in token.items():
            _tap(conv, fine[out], source[inp], 1.0)
        for n in carried:
            _tap(conv, fine[n], source[n], 1.0)
        fine.fill(conv)

    # full resolution: offsets in the cell, i − m and j − m for m = 0..cell−2, straight from the last upsampling
    offsets = [f"{a}{m}" for a in "ij" for m in range(cell - 1)]
    full = _Slots([*offsets, *carried], width)
    conv = dec.up[2].upsample.conv
    for a, ramp, token, dy, dx in (("i", "Ry", "ry", -1, 0), ("j", "Rx", "rx", 0, -1)):
        for m in range(cell - 1):  # offset = R − cell·r + cell − 1
            _tap(conv, full[f"{a}{m}"], fine[ramp], 1.0)
            _tap(conv, full[f"{a}{m}"], fine[ramp], 1.0, dy, dx)
            _tap(conv, full[f"{a}{m}"], fine[token], -float(cell))
            _bias(conv, full[f"{a}{m}"], cell - 1.0 - m)
    for n in carried:
        _tap(conv, full[n], fine[n], 1.0)
    full.fill(conv)

    # the last res block: ReLU(i − m), ReLU(j − m), shape flags → one AND unit per (shape, distinct mask row)
    block = dec.up[3].block[0]
    full.norm(block.norm1, [*offsets, *shapes], gain=_TOY_RELU)
    units: list[tuple[str, np.ndarray, np.ndarray]] = []  # (shape slot, row set, column set)
    for s, shape in enumerate(SHAPES):
        mask = shape_mask(shape, cell).astype(np.float64)
        for row in sorted({tuple(r) for r in mask if r.any()}):
            rows = np.array([tuple(r) == row for r in mask], np.float64)
            units.append((shapes[s], rows, np.array(row)))
    ands = _Slots([f"and{u}" for u in range(len(units))], width)
    for u, (flag, rows, cols) in enumerate(units):  # rows(i) + cols(j) + flag − 2 > 0 only when all hold
        out, bias = ands[f"and{u}"], -2.0
        for axis, values in (("i", rows), ("j", cols)):
            const, coef = _integer_basis(values, cell)
            bias += const
            for m, c in enumerate(coef):
                _tap(block.conv1, out, full[f"{axis}{m}"], float(c) / _TOY_RELU)
        _tap(block.conv1, out, full[flag], 1.0 / _TOY_RELU)
        _bias(block.conv1, out, bias)
    ands.fill(block.conv1)
    ands.norm(block.norm2, list(ands.index), gain=_TOY_RELU)
    for n in colours:  # colour slot += K·(mask − 1), mask = Σ units (disjoint rows): below zero off the shape
        for u in range(len(units)):
            _tap(block.conv2, full[n], ands[f"and{u}"], _TOY_MASK_GAIN / _TOY_RELU)
        _bias(block.conv2, full[n], -_TOY_MASK_GAIN)

    # out: background + ReLU(colour up) − ReLU(colour down)
    full.norm(dec.norm_out, colours, gain=_TOY_RELU)
    k = dec.conv_out.kernel_size[0] // 2
    for ch in range(3):
        dec.conv_out.weight[ch, full[f"dp{ch}"], k, k] = 1.0 / _TOY_RELU
        dec.conv_out.weight[ch, full[f"dm{ch}"], k, k] = -1.0 / _TOY_RELU
        dec.conv_out.bias[ch] = float(bg[ch])


def toy_components(resolution: int = 64, seed: int = 0, hidden_size: int = 128, num_layers: int = 4,
                   num_heads: int = 4, rope_theta: float = 10000.0,
                   copy_logit: float = 0.0, source_fusion: float = 1.0) -> dict[str, Any]:
    """A fresh tiny Janus (Llama LM, constructed VQ-VAE, a tubelet SigLIP for the understanding path) + word
    tokenizer + the `JanusProcessor` that path reads images with (`_understanding_path`)."""
    if resolution % _TOY_CELL or not 2 * _TOY_CELL <= resolution <= 8 * _TOY_CELL:
        raise ValueError(f"the toy token model needs a resolution that is a multiple of {_TOY_CELL}, {2 * _TOY_CELL} "
                         f"to {8 * _TOY_CELL} (its decoder counts at most 8 tokens to the edge); got {resolution}")
    tokenizer = build_word_tokenizer(named={"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE})
    grid = resolution // _TOY_CELL
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                       max_position_embeddings=2 * grid * grid + _TOY_TEXT_POSITIONS + 40,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, rope_theta=rope_theta,
                       initializer_range=hidden_size**-0.5)
    vq = _toy_vq_config(resolution, hidden_size) | {"num_embeddings": 1 + len(COLORS) * len(SHAPES)}
    vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": resolution,
              "patch_size": _TOY_CELL, "projection_dim": hidden_size, "mlp_ratio": 1.0, "depth": 1,
              "num_image_tokens": grid * grid}
    config = JanusConfig(text_config=text.to_dict(), vision_config=vision, vq_config=vq,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE), text_positions=_TOY_TEXT_POSITIONS,
                         source_copy_logit=copy_logit, source_fusion=source_fusion)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(config)
    _construct_toy_vq(model.model.vqmodel, resolution)
    _balance_image_embeddings(model)
    processor = _understanding_path(model, tokenizer, resolution, hidden_size, seed)
    return {"model": model.eval(), "tokenizer": tokenizer, "processor": processor}


UNDERSTANDING_REACH = 2
"""The toy Janus's SigLIP sees each cell's cross of cells up to 2 away, before and after, as the toy IDM's CLIP."""


def _understanding_path(model: JanusForConditionalGeneration, tokenizer: Any, resolution: int, hidden_size: int,
                        seed: int) -> Any:
    """Give the toy Janus an understanding path an IDM adapter can train (the paper's single-model setting), and
    return the `JanusProcessor` that feeds it.

    Janus reads images for text through SigLIP + an aligner, apart from the VQ path the world model uses. The
    toy's are built as the toy IDM's CLIP is (`cwm_ray.toyworld.idm_model`): patch 8 (one toy cell a token) and
    a tubelet of 6·(1 + 4r) channels, so each token sees its cell before and after and the cells around it
    (`cwm_ray.idm.patch_neighbourhood`), at the language model's width; pixels centred on the board's colour.
    They are built after the rest of the model, under their own seed, so the world model's initialisation is
    the one every earlier measurement used; the world model's training leaves them frozen (`trainable`), so
    only an IDM adapter trains them (`idm.lora.modules_to_save`).
    """
    from PIL import Image
    from transformers import JanusImageProcessor, JanusProcessor, JanusVisionConfig
    from transformers.models.janus.modeling_janus import JanusVisionAlignerMLP, JanusVisionModel

    grid = resolution // _TOY_CELL
    vision = JanusVisionConfig(hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=4, mlp_ratio=4.0,
                               num_channels=6 * (1 + 4 * UNDERSTANDING_REACH), patch_size=_TOY_CELL,
                               image_size=resolution, projection_dim=model.config.text_config.hidden_size, depth=2,
                               num_image_tokens=grid * grid)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        model.model.vision_model = JanusVisionModel(vision)
        model.model.aligner = JanusVisionAlignerMLP(vision)
    model.config.vision_config = vision
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    image_processor = JanusImageProcessor(
        size={"height": resolution, "width": resolution}, resample=Image.Resampling.NEAREST,
        image_mean=[c / 255 for c in BACKGROUND], image_std=[0.25] * 3)
    return JanusProcessor(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=grid * grid)


@torch.no_grad()
def _balance_image_embeddings(model: JanusForConditionalGeneration) -> None:
    """Start the image-token input path (`generation_embeddings` → the two-layer `generation_aligner`) at the
    text embeddings' scale, by scaling the aligner's last layer.

    At a standard init (std 0.02) three small matrices in a row put the image embeddings at RMS 3e-4, under
    the Llama's RMSNorm epsilon (1e-6, i.e. 1e-3 in RMS): the norm then crushed every image token to nearly
    the same small vector, so the model could barely tell one source code from another. With the source fused
    in but that init the toy's loss still stood at 0.085 after 700 steps; with this one it was 0.042 by step
    500. A pretrained Janus has no such problem; only a fresh one does.
    """
    codes = torch.arange(model.config.vq_config.num_embeddings)[None]
    text = model.get_input_embeddings().weight.float().pow(2).mean().sqrt()
    image = model.prepare_embeddings_for_image_generation(codes).float().pow(2).mean().sqrt()
    last = model.model.generation_aligner.hidden_layers[-1]
    last.weight.mul_(text / image)
    last.bias.mul_(text / image)


def build_toy_token_world_model(directory: str | None = None, resolution: int = 64, seed: int = 0,
                                **hyper: Any) -> TokenWorldModel:
    """A fresh tiny Janus-architecture world model, saved to `directory` (local or s3://) if given.

    `hyper` overrides `toy_components` (hidden_size, num_layers, num_heads); tests make it smaller still.
    The saved directory loads by path through `load_world_model` with `backend: token`.
    """
    components = toy_components(resolution, seed, **hyper)
    if directory is not None:
        wm = TokenWorldModel(WorldModelConfig(backend="token", model=TOY, device="cpu"), components=components)
        wm.save(directory)
    return TokenWorldModel(WorldModelConfig(backend="token", model=directory or TOY, resolution=resolution),
                           components=components)


def components_from_config(cfg: WorldModelConfig) -> dict[str, Any]:
    """`WorldModelConfig(backend="token", model="toy")`: the toy's components at the config's `resolution`
    (64 px when unset)."""
    return toy_components(cfg.resolution or 64)


__all__ = ["build_toy_token_world_model", "components_from_config", "toy_components"]
