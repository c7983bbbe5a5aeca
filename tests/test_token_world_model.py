"""The token (Janus) world model, built tiny, saved with save_pretrained and loaded by path (never mocked)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cwm_ray.config import LoRAConfig, ToyWorldConfig, WorldModelConfig
from cwm_ray.recognition import recognition_weights
from cwm_ray.schema import encode_image
from cwm_ray.toyworld.render import render
from cwm_ray.toyworld.token_model import build_toy_token_world_model
from cwm_ray.toyworld.world import Obj, Scene, random_scene
from cwm_ray.world_model import WorldModel, load_world_model
from cwm_ray.world_model.token import BOI, EOI, TokenWorldModel

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}
ACTIONS = ["move the red circle left", "remove the blue square", "make the green cross red"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("toy_token_world_model")
    build_toy_token_world_model(str(path), seed=0, **TINY)
    return str(path)


def _load(model: str, **kw: object) -> TokenWorldModel:
    wm = load_world_model(WorldModelConfig(backend="token", model=model, device="cpu", **kw))
    assert isinstance(wm, TokenWorldModel)
    return wm


def _images(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [encode_image(render(random_scene(rng, ToyWorldConfig()), ToyWorldConfig())) for _ in range(n)]


def _batch(n: int = 3) -> dict[str, np.ndarray]:
    return {"source": np.array(_images(n, 0), dtype=object), "target": np.array(_images(n, 1), dtype=object),
            "action": np.array(ACTIONS[:n], dtype=object)}


def test_loads_by_path_as_janus(tiny_dir: str) -> None:
    wm = _load(tiny_dir)
    assert isinstance(wm, WorldModel)
    assert type(wm.model).__name__ == "JanusForConditionalGeneration" and wm.resolution == 64
    assert wm.encode_features(_images(2)).shape == (2, 49, 8, 8)  # one feature per image token


def test_layout_puts_the_loss_on_exactly_the_target_image_tokens(tiny_dir: str) -> None:
    wm = _load(tiny_dir)
    m, tok = wm.module, wm.tokenizer
    batch = wm.collate(_batch())
    src, tgt = batch["source_codes"], batch["target_codes"]
    ids, is_image, mask, positions = m.layout(src, batch["input_ids"], batch["attention_mask"], tgt)
    n = tgt.shape[1]
    for b in range(3):
        row = ids[b][mask[b].bool()]
        img = is_image[b][mask[b].bool()]
        text = tok(ACTIONS[b], add_special_tokens=False).input_ids
        boi, eoi = tok.convert_tokens_to_ids(BOI), tok.convert_tokens_to_ids(EOI)
        expected = [tok.bos_token_id, boi, *src[b].tolist(), eoi, *text, boi, *tgt[b, :-1].tolist()]
        assert row.tolist() == expected
        assert img.tolist() == [False, False] + [True] * n + [False] * (2 + len(text)) + [True] * (n - 1)
        # every target code sits the same distance after its source code, whatever the action's length
        pos = positions[b][mask[b].bool()]
        assert pos[2:2 + n].tolist() == list(range(2, 2 + n))
        start = 2 + n + 2 + m.text_positions  # [bos] <boi> src <eoi> text span <boi>
        assert pos[-(n - 1):].tolist() == list(range(start, start + n - 1))
    assert m.text_positions == 24 and len({len(tok(a).input_ids) for a in ACTIONS}) > 1
    with pytest.raises(ValueError, match="at most 24"):
        m.layout(src[:1], torch.ones(1, 25, dtype=torch.long), torch.ones(1, 25, dtype=torch.long), tgt[:1])
    long = wm.collate({k: v[:1] for k, v in _batch().items()} | {"action": np.array([" ".join(["red"] * 40)])})
    assert long["input_ids"].shape[1] == 24  # longer actions are cut to the span, as CLIP cuts at 77 tokens
    # the loss sees the target codes and nothing else: perturbing logits off the last n positions changes nothing
    hidden: list[torch.Tensor] = []
    handle = m.model.model.generation_head.register_forward_hook(lambda _m, args, _out: hidden.append(args[0]))
    try:
        wm.loss(batch)
    finally:
        handle.remove()
    assert hidden[0].shape[1] == n  # the head runs on exactly the n positions that predict target codes


def test_target_codes_alone_drive_the_loss(tiny_dir: str) -> None:
    """Changing a source code or the action changes the loss only through attention; changing a target
    code at position k changes the NLL term at k: the loss is indexed by the target codes."""
    wm = _load(tiny_dir)
    m = wm.module.eval()
    batch = wm.collate(_batch())
    src, tgt = batch["source_codes"], batch["target_codes"]
    ids, is_image, mask, positions = m.layout(src, batch["input_ids"], batch["attention_mask"], tgt)
    embeds = m.embed(ids, is_image)
    embeds[:, -tgt.shape[1]:] = m.fuse(embeds[:, -tgt.shape[1]:], src)  # each target position reads its source
    hidden = m.model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                          position_ids=positions).last_hidden_state
    logits = m.image_logits(hidden[:, -tgt.shape[1]:])
    manual = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
    torch.testing.assert_close(wm.loss(batch), manual)


def test_collate_tokenizes_each_distinct_image_once(tiny_dir: str) -> None:
    """Codes are the VQ's (cosine-nearest entry of the pre-quantization features), kept per image content."""
    wm = _load(tiny_dir)
    wm.recognition.enabled = False  # (recognition weights without a weights column run the encoder too)
    calls: list[int] = []
    handle = wm.module.vq.encoder.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    try:
        first = wm.collate(_batch())
        second = wm.collate(_batch())  # a second epoch over the same rows
        shuffled = wm.collate({k: v[::-1] for k, v in _batch().items()})
    finally:
        handle.remove()
    assert calls == [3, 3]  # sources, then targets, of the first batch only
    pixels = wm._pixels(list(_batch()["source"]))
    assert torch.equal(first["source_codes"], wm.module.tokenize(pixels))
    assert torch.equal(second["target_codes"], first["target_codes"])
    assert torch.equal(shuffled["source_codes"], first["source_codes"].flip(0))
    # with recognition weights computed here, the codes come from the same features: one encoder pass each
    fresh = _load(tiny_dir)
    calls.clear()
    handle = fresh.module.vq.encoder.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    try:
        weighted = fresh.collate(_batch())
        assert fresh.recognition.enabled and calls == [3, 3]
        # the maps are kept per (source, target) pair like the codes: a second epoch runs no encoder
        again = fresh.collate({k: v[::-1] for k, v in _batch().items()})
        assert calls == [3, 3] and torch.equal(again["weights"], weighted["weights"].flip(0))
        batch = _batch()
        swapped = fresh.collate({"source": batch["target"], "target": batch["source"], "action": batch["action"]})
        assert calls == [3, 3, 3, 3]  # new pairs of the same images: their own maps, so the features again
    finally:
        handle.remove()
    assert torch.equal(weighted["source_codes"], first["source_codes"])
    assert torch.equal(weighted["target_codes"], first["target_codes"])
    assert torch.equal(swapped["source_codes"], first["target_codes"])
    plain = recognition_weights(fresh.encode_features(list(batch["target"])),
                                fresh.encode_features(list(batch["source"])), fresh.recognition.floor)
    torch.testing.assert_close(swapped["weights"], plain)


def test_all_ones_weights_are_exactly_the_unweighted_nll(tiny_dir: str) -> None:
    wm = _load(tiny_dir)
    batch = wm.collate(_batch())
    inputs = {k: v for k, v in batch.items() if k != "weights"}
    plain = wm.loss(inputs, None)
    assert torch.equal(wm.loss(inputs, torch.ones(3, 8, 8)), plain)
    assert not torch.allclose(wm.loss(inputs, batch["weights"]), plain)  # recognition weights do change it


def test_recognition_weights_come_from_pre_quantization_features(tiny_dir: str) -> None:
    wm = _load(tiny_dir)
    world = ToyWorldConfig()
    before = render(Scene((Obj("circle", "red", 2, 3), Obj("square", "blue", 6, 6))), world)
    after = render(Scene((Obj("circle", "red", 2, 5), Obj("square", "blue", 6, 6))), world)
    m = wm.module
    pixels = wm._pixels([before, after])
    feats = wm.encode_features(pixels)
    vq = m.vq
    torch.testing.assert_close(feats, vq.quant_conv(vq.encoder(pixels)))  # quant_conv(encoder(x)), unquantized
    w = recognition_weights(feats[:1], feats[1:], floor=0.1)[0]
    assert w.shape == (8, 8)
    changed = {(2, 3), (2, 5)}
    assert all(w[r, c] > 1 for r, c in changed)
    assert all(abs(w[r, c].item() - 0.1) < 1e-5 for r in range(8) for c in range(8) if (r, c) not in changed)
    batch = wm.collate({"source": np.array([encode_image(before)], dtype=object),
                        "target": np.array([encode_image(after)], dtype=object), "action": np.array(["x"])})
    torch.testing.assert_close(batch["weights"][0], w)


@pytest.mark.parametrize("resolution", [64, 40])
def test_toy_vq_decodes_every_code_at_every_cell_pixel_exact(resolution: int) -> None:
    """Tokenize → decode gives back a still toy frame to the pixel: shapes, colours, every cell of the grid."""
    from cwm_ray.toyworld.token_model import _palette

    wm = build_toy_token_world_model(resolution=resolution, **TINY)
    m, grid = wm.module, resolution // 8
    frame = _palette(resolution)[0]  # the background and each shape × colour in one frame
    codes = m.tokenize(wm._pixels([frame]))[0]
    assert sorted(codes.unique().tolist()) == list(range(25))
    cells = frame.reshape(grid, 8, grid, 8, 3)
    shifts = [(dy, dx) for dy in range(grid) for dx in range(grid)]  # so every code visits every cell
    moved = torch.stack([codes.view(grid, grid).roll(s, (0, 1)).flatten() for s in shifts])
    expected = np.stack([np.roll(cells, s, (0, 2)).reshape(resolution, resolution, 3) for s in shifts])
    decoded = ((m.decode(moved).permute(0, 2, 3, 1).numpy() + 1.0) * 127.5).round().astype(np.int16)
    assert np.abs(decoded - expected).max() == 0
    with pytest.raises(ValueError, match="16 to 64"):
        build_toy_token_world_model(resolution=72, **TINY)


def test_sample_returns_decoded_images_seeded_per_candidate(tiny_dir: str) -> None:
    wm = _load(tiny_dir)
    sources, actions = _images(2), ACTIONS[:2]
    out = wm.sample(sources, actions, n=[1, 2], seed=[5, 9])
    assert [len(c) for c in out] == [1, 2]
    assert all(im.size == (64, 64) and im.mode == "RGB" for c in out for im in c)
    arrays = lambda cands: np.stack([np.asarray(im, np.int16) for im in cands])  # noqa: E731
    alone = wm.sample(sources[1:], actions[1:], n=2, seed=9)[0]
    assert np.array_equal(arrays(out[1]), arrays(alone))  # an input's candidates ignore the rest of the batch
    assert not np.array_equal(arrays(out[1][:1]), arrays(out[1][1:]))  # candidates differ
    with pytest.raises(ValueError, match="one n"):
        wm.sample(sources, actions, n=[1], seed=0)


def test_guided_greedy_sampling_is_batched_once_per_token(tmp_path: Path, tiny_dir: str) -> None:
    from cwm_ray.config import TokenSamplingConfig

    wm = _load(tiny_dir, token=TokenSamplingConfig(temperature=0.0, top_k=4, guidance_scale=3.0))
    sizes: list[int] = []
    handle = wm.module.model.model.generation_head.register_forward_pre_hook(
        lambda _m, args: sizes.append(args[0].shape[0]))
    try:
        out = wm.sample(_images(2), ACTIONS[:2], n=2, seed=0)
    finally:
        handle.remove()
    assert sizes == [2 * 2 * 2] * 64  # (cond, uncond) × inputs × n, once per image token
    assert np.array_equal(np.asarray(out[0][0]), np.asarray(out[0][1]))  # greedy: candidates agree


def _sample_unshared(wm: TokenWorldModel, sources: list[bytes], actions: list[str], n: int | list[int],
                     seed: int | list[int]) -> list[list[np.ndarray]]:
    """The sampler as it was before the prompt was shared: every candidate runs its own copy of the prompt.

    Kept as the reference the shared-prefix sampler must match token for token (same seeds, same images); it
    fuses each position's source code into its input as `TokenWorldModel.sample` does (`source_fusion`).
    """
    from transformers import DynamicCache

    from cwm_ray.world_model import candidate_seed

    m, opts = wm.module, wm.cfg.token
    counts = [n] * len(sources) if isinstance(n, int) else list(n)
    seeds = [(seed, i) for i in range(len(sources))] if isinstance(seed, int) else [(s, 0) for s in seed]
    repeats = torch.tensor(counts)
    source = wm.codes(sources).repeat_interleave(repeats, 0)
    input_ids, text_mask = (t.repeat_interleave(repeats, 0) for t in wm._tokenize_text(actions))
    total = source.shape[0]
    guided = opts.guidance_scale != 1.0
    drop = torch.tensor([False] * total + [True] * total) if guided else None
    if guided:
        source, input_ids, text_mask = (torch.cat([t, t]) for t in (source, input_ids, text_mask))
    ids, is_image, mask, positions = m.layout(source, input_ids, text_mask, None, drop)
    gens = [torch.Generator().manual_seed(candidate_seed(s, i, j))
            for (s, i), k in zip(seeds, counts, strict=True) for j in range(k)]
    with torch.no_grad():
        embeds = m.embed(ids, is_image)
        embeds[:, -1] = m.fuse(embeds[:, -1:], source[:, :1])[:, 0]
        hidden, cache = m.run(embeds, mask, positions, cache=DynamicCache(config=wm.model.config.text_config))
        codes = []
        for p in range(m.grid**2):
            logits = m.image_logits(hidden[:, -1]).float()
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + opts.guidance_scale * (cond - uncond)
            code = wm._draw(logits, gens, opts.temperature, opts.top_k)
            codes.append(code)
            step = torch.cat([code, code]) if guided else code
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = positions[:, -1:] + 1
            fused = m.fuse(wm.model.prepare_embeddings_for_image_generation(step[:, None]),
                           source[:, p + 1:p + 2] if p + 1 < m.grid**2 else source[:, :1])
            hidden, cache = m.run(fused, mask, positions, cache=cache)
        pixels = m.decode(torch.stack(codes, 1))
    arrays = ((pixels.permute(0, 2, 3, 1).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
    ends = np.cumsum(counts).tolist()
    return [list(arrays[end - k:end]) for k, end in zip(counts, ends, strict=True)]


@pytest.mark.parametrize(("guidance", "temperature", "top_k"), [(1.0, 1.0, 0), (3.0, 1.0, 8), (3.0, 0.0, 0)])
def test_shared_prompt_sampling_matches_the_unshared_sampler(tiny_dir: str, guidance: float, temperature: float,
                                                             top_k: int) -> None:
    """Best-of-N runs each input's prompt once and branches its KV cache over the candidates; candidate j of
    input i must still be exactly the image the old sampler (the prompt run once per candidate) drew."""
    from cwm_ray.config import TokenSamplingConfig

    wm = _load(tiny_dir, token=TokenSamplingConfig(temperature=temperature, top_k=top_k, guidance_scale=guidance))
    sources, actions = _images(3, seed=4), [ACTIONS[0], "remove the red square from the top left", ACTIONS[2]]
    for n, seed in ((3, 7), ([1, 4, 2], [5, 9, 11])):
        got = [[np.asarray(im) for im in cands] for cands in wm.sample(sources, actions, n=n, seed=seed)]
        want = _sample_unshared(wm, sources, actions, n, seed)
        assert [len(c) for c in got] == [len(c) for c in want]
        for g, w in zip(got, want, strict=True):
            assert all(np.array_equal(a, b) for a, b in zip(g, w, strict=True))


def test_best_of_n_runs_the_prompt_once_per_input(tiny_dir: str) -> None:
    wm = _load(tiny_dir)
    lengths: list[tuple[int, int]] = []
    handle = wm.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: lengths.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True)
    try:
        wm.sample(_images(2), ACTIONS[:2], n=8, seed=0)
    finally:
        handle.remove()
    prompt, steps = lengths[0], lengths[1:]
    assert prompt[0] == 2 and prompt[1] > 64  # the prompt: one row per input
    assert steps == [(16, 1)] * 63  # then one token per step for every candidate (the last code needs no run)


def test_full_and_lora_fine_tuning_round_trip(tiny_dir: str, tmp_path: Path) -> None:
    wm = _load(tiny_dir)
    module = wm.training_module()
    assert not any(p.requires_grad for p in wm.model.model.vqmodel.parameters())
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    module(**wm.collate(_batch())).backward()
    opt.step()
    wm.save(str(tmp_path / "ft"))
    again = _load(str(tmp_path / "ft"))
    for a, b in zip(wm.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    lora = _load(tiny_dir, lora=LoRAConfig(enabled=True, r=4, alpha=8))
    trainable = [n for n, p in lora.training_module().named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    with torch.no_grad():  # B starts at zero; make the adapter actually change the model
        for name, param in lora.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    lora.save(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    adapted = _load(tiny_dir, adapter=str(tmp_path / "adapter"))
    batch = wm.collate(_batch())
    lora.module.eval()
    torch.testing.assert_close(adapted.loss(batch, batch["weights"]), lora.loss(batch, batch["weights"]))
    assert not torch.allclose(adapted.loss(batch), wm.loss(batch))


def test_the_toy_janus_is_also_an_idm_whose_adapter_trains_the_understanding_path(tiny_dir: str,
                                                                                 tmp_path: Path) -> None:
    """Issue 36, item 2: one toy Janus as world model and IDM. A full fine-tune's export keeps the checkpoint's
    JanusProcessor, so it loads as an IDM (its tubelet SigLIP reads the pair as one image). The world model's
    training leaves that understanding path frozen, so the IDM adapter trains it whole beside LoRA on the Llama
    (`idm.lora.modules_to_save`), and both exports (the adapter alone, and merged) reload with the trained scores."""
    from cwm_ray.config import ConfigError, IDMConfig
    from cwm_ray.idm import InverseDynamicsModel

    wm = _load(tiny_dir)
    wm.training_module()
    assert not any(p.requires_grad for p in wm.model.model.vision_model.parameters())
    wm.save(str(tmp_path / "ft"))
    assert (tmp_path / "ft" / "processor_config.json").exists()
    cfg = IDMConfig(model=str(tmp_path / "ft"), image_size=64, device="cpu", lora_export="adapter")
    idm = InverseDynamicsModel.load(cfg)
    assert type(idm.processor).__name__ == "JanusProcessor" and idm.tubelet
    assert idm.prompt == "<image_placeholder>what action turns the first image into the second ?"
    sources, targets = _images(3, 0), _images(3, 1)
    before = idm.score_batch(sources, targets, ACTIONS)
    saved = ["model.vision_model", "model.aligner", "lm_head"]
    module = idm.training_module(LoRAConfig(enabled=True, r=4, alpha=8, modules_to_save=saved))
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert all(("lora_" in n and ".language_model." in n) or ".modules_to_save." in n for n in trainable), trainable
    assert {m for m in saved if any(f"{m}.modules_to_save." in n for n in trainable)} == set(saved)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        module(**idm.collate(_batch())).backward()
        opt.step()
        opt.zero_grad()
    trained = idm.score_batch(sources, targets, ACTIONS)
    assert np.abs(trained - before).max() > 0.1
    idm.save(str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter" / "config.json").exists()
    reloaded = InverseDynamicsModel.load(IDMConfig(model=str(tmp_path / "ft"), adapter=str(tmp_path / "adapter"),
                                                   image_size=64, device="cpu"))
    np.testing.assert_allclose(reloaded.score_batch(sources, targets, ACTIONS), trained, rtol=1e-5, atol=1e-5)
    idm.cfg.lora_export = "merged"
    idm.save(str(tmp_path / "merged"))
    merged = InverseDynamicsModel.load(IDMConfig(model=str(tmp_path / "merged"), image_size=64, device="cpu"))
    np.testing.assert_allclose(merged.score_batch(sources, targets, ACTIONS), trained, rtol=1e-4, atol=1e-4)

    with pytest.raises(ConfigError, match="modules_to_save: JanusForConditionalGeneration has no module named "
                                          "model.vision_tower"):
        InverseDynamicsModel.load(cfg).training_module(LoRAConfig(enabled=True, modules_to_save=["model.vision_tower"]))
    with pytest.raises(ConfigError, match="world_model.lora.modules_to_save"):
        WorldModelConfig(backend="token", lora=LoRAConfig(enabled=True, modules_to_save=["lm_head"]))


def test_serve_app_with_the_token_backend(tiny_dir: str, tmp_path: Path) -> None:
    """The Serve app with `world_model.backend: token`: best-of-N over decoded token samples, and an action
    longer than the model's text span is cut (200), not a failure of the batch it shares."""
    import base64
    import socket

    import httpx
    import ray
    from ray import serve

    from cwm_ray.serve.app import build_app
    from cwm_ray.toyworld.idm_model import build_toy_idm

    build_toy_idm(str(tmp_path / "idm"), image_size=64, hidden_size=32, text_layers=1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # its own Ray, before the module's 2-CPU one: the app's three deployments take a CPU each
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"world_model": {"backend": "token", "model": tiny_dir, "device": "cpu"},
                             "idm": {"model": str(tmp_path / "idm"), "image_size": 64, "device": "cpu"},
                             "best_of": 2}), name="cwm_token", route_prefix="/")
        image = base64.b64encode(_images(1)[0]).decode()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            for action in (ACTIONS[0], " ".join(["red"] * 40)):
                r = client.post("/v1/predict", json={"image": image, "action": action, "best_of": 3, "seed": 4,
                                                     "return_candidates": True})
                assert r.status_code == 200, r.text
                out = r.json()
                scores = [c["score"] for c in out["candidates"]]
                assert len(scores) == 3 and out["chosen"] == int(np.argmax(scores))
                assert Image.open(io.BytesIO(base64.b64decode(out["image"]))).size == (64, 64)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local() -> None:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    yield
    ray.shutdown()


@pytest.mark.fault
def test_deepspeed_two_workers_checkpoint_and_resume(ray_local: None, tiny_dir: str, tmp_path: Path) -> None:
    """ZeRO-2 on 2 workers: the loss falls, and a run whose worker dies after its checkpoint at step 8 resumes and
    ends with every tensor, random state and loss of the run that never stopped."""
    from test_train import assert_resumed_like_uninterrupted

    from cwm_ray.config import ToyCorpusConfig, TrainWorldModelConfig, load
    from cwm_ray.toyworld.corpus import make_corpus
    from cwm_ray.train import train

    make_corpus(ToyCorpusConfig(output=str(tmp_path / "corpus"), num_videos=0, num_train=48, num_test=4))
    gold = tmp_path / "corpus" / "gold" / "train.json"
    args = ["world_model.backend=token", f"world_model.model={tiny_dir}", f"train.storage_path={tmp_path / 'runs'}",
            "train.log_every=2", "optim.max_steps=10",
            "train.eval_every=4", "train.checkpoint_every=4", "optim.batch_size=4", "optim.warmup_steps=1",
            "optim.lr=3e-3", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "scaling.torch_threads=1",
            "deepspeed.zero_stage=2", "data.val_fraction=0.2", f"data.sources=[{{uri: {gold}}}]"]
    first = train(load(TrainWorldModelConfig, None, [*args, "train.name=tok", f"train.export={tmp_path / 'export'}"]))
    losses = [m["loss"] for m in first["history"]]
    assert first["steps"] == 10 and losses[-1] < losses[0]
    assert first["history"][-1]["val_loss"] is not None
    killed = train(load(TrainWorldModelConfig, None, [*args, "train.name=killed", "train.fail_at_step=9",
                                                      f"train.export={tmp_path / 'killed'}"]))
    assert killed["steps"] == 10 and killed["resumed_from"] == [8]
    assert_resumed_like_uninterrupted(first, killed, (tmp_path / "export", tmp_path / "killed"),
                                      (Path(first["checkpoint"]), Path(killed["checkpoint"])))
    wm = _load(str(tmp_path / "export"))
    out = wm.sample(_images(1), ACTIONS[:1], n=2, seed=0)
    assert len(out[0]) == 2 and out[0][0].size == (64, 64)


def test_stored_recognition_maps_reach_the_loss_unchanged(ray_local: None, tiny_dir: str, tmp_path: Path) -> None:
    """Annotation's maps are computed once and used: through a gold + triplets mix (`training_sets`), Ray Data's
    batches and `collate`, a synthetic row's loss weights are its stored map exactly, and a gold row's the encoder's."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from cwm_ray.config import DataSection, DataSource
    from cwm_ray.data import TRAIN_SCHEMA, training_sets
    from cwm_ray.schema import weights_to_bytes
    wm = _load(tiny_dir)
    wm.module.eval()  # no conditioning dropout: the two losses below see the same inputs
    src, tgt = _images(3, 0), _images(3, 1)
    # maps no encoder would give (a ramp and a corner): what reaches the loss must be these
    maps = [np.linspace(0.25, 1.75, 64).reshape(8, 8), np.where(np.eye(8) > 0, 4.0, 0.5)]
    encoded = [weights_to_bytes(m) for m in maps]
    (tmp_path / "triplets").mkdir()
    pq.write_table(pa.table({"id": ["s0", "s1"], "source": src[:2], "target": tgt[:2], "action": ACTIONS[:2],
                             "weights": [b for b, _ in encoded], "weights_shape": [sh for _, sh in encoded]},
                            schema=TRAIN_SCHEMA), tmp_path / "triplets" / "part-0.parquet")
    (tmp_path / "gold").mkdir()
    (tmp_path / "gold" / "s.png").write_bytes(src[2])
    (tmp_path / "gold" / "t.png").write_bytes(tgt[2])
    (tmp_path / "gold" / "train.json").write_text(json.dumps([{"input": "s.png", "output": "t.png", "id": "g",
                                                               "instruction": ACTIONS[2]}]))
    sets = training_sets(DataSection(sources=[DataSource(uri=str(tmp_path / "gold" / "train.json")),
                                              DataSource(uri=str(tmp_path / "triplets"))], val_fraction=0))
    batch = next(iter(sets.train.iter_batches(batch_size=3, batch_format="numpy")))
    collated = wm.collate(batch)
    expected = {"s0": torch.from_numpy(maps[0].astype(np.float16).astype(np.float32)),
                "s1": torch.from_numpy(maps[1].astype(np.float16).astype(np.float32)),
                "g": recognition_weights(wm.encode_features([src[2]]), wm.encode_features([tgt[2]]), 0.1)[0]}
    for i, row in enumerate(batch["id"]):
        torch.testing.assert_close(collated["weights"][i], expected[str(row)], rtol=0, atol=1e-6 if row == "g" else 0)
    # ... and the training module's loss is the weighted NLL under exactly those maps
    weights = torch.stack([expected[str(row)] for row in batch["id"]])
    inputs = {k: v for k, v in collated.items() if k != "weights"}
    torch.testing.assert_close(wm.module(**collated), wm.loss(inputs, weights))
    assert not torch.allclose(wm.module(**collated), wm.loss(inputs, None))


def test_the_training_loop_fades_recognition_weights_to_uniform(ray_local: None, tiny_dir: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`recognition.uniform_by`: the weights the loss sees in training are the recognition maps at step 0 and all
    ones from uniform_by · max_steps on (the mix is applied in `train_func`, not only defined)."""
    import json

    import cwm_ray.train
    from cwm_ray.config import ToyCorpusConfig, TrainWorldModelConfig, load
    from cwm_ray.toyworld.corpus import make_corpus

    make_corpus(ToyCorpusConfig(output=str(tmp_path / "corpus"), num_videos=0, num_train=48, num_test=4))
    seen, real = tmp_path / "weights.jsonl", cwm_ray.train.build_model

    def build(cfg: TrainWorldModelConfig) -> TokenWorldModel:
        """The real model, with a hook that writes down the weights of every training forward."""
        model = real(cfg)
        make = model.training_module

        def training_module() -> torch.nn.Module:
            module = make()

            def hook(mod: torch.nn.Module, _args: tuple, kwargs: dict) -> None:
                if mod.training:
                    w = kwargs["weights"].float()
                    with open(seen, "a") as f:
                        f.write(json.dumps([w.min().item(), w.max().item(), w.mean().item()]) + "\n")

            module.register_forward_pre_hook(hook, with_kwargs=True)
            return module

        model.training_module = training_module
        return model

    monkeypatch.setattr(cwm_ray.train, "build_model", build)
    cwm_ray.train.train(load(TrainWorldModelConfig, None, [
        "world_model.backend=token", f"world_model.model={tiny_dir}", "train.name=fade",
        f"train.storage_path={tmp_path / 'runs'}", f"train.export={tmp_path / 'export'}", "optim.batch_size=4",
        "optim.max_steps=8", "scaling.num_workers=1", "scaling.cpus_per_worker=1", "scaling.torch_threads=1",
        "data.val_fraction=0", "recognition.enabled=true", "recognition.uniform_by=0.5",
        f"data.sources=[{{uri: {tmp_path / 'corpus' / 'gold' / 'train.json'}}}]"]))
    steps = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(steps) == 8
    assert steps[0][1] > 2.0  # step 0: the recognition maps themselves (the changed cells weigh most)
    assert all(abs(mean - 1.0) < 1e-4 for _, _, mean in steps)  # the mix keeps each map's mean at 1
    assert all(lo == hi == 1.0 for lo, hi, _ in steps[4:])  # uniform from 0.5 · 8 steps on


def test_the_copy_prior_makes_an_untrained_model_copy_the_source_and_enters_the_loss(tmp_path: Path) -> None:
    """`source_copy_logit` in the Janus config: each target token's own source code gets that logit on top, in
    the loss and in the sampler alike; 0 (the default, and every real checkpoint) leaves both as they were."""
    import json

    from cwm_ray.schema import decode_image
    from cwm_ray.toyworld.parser import parse_scene

    path, plain_path = tmp_path / "copying", tmp_path / "no_prior"
    build_toy_token_world_model(str(path), seed=0, copy_logit=8.0, **TINY)
    wm = _load(str(path))
    assert wm.module.copy_logit == 8.0
    sources = _images(3, 4)
    # Random logits are ~0.01 apart: the prior alone decides, so greedy decoding gives back the source scene.
    wm.cfg.token.temperature = 0.0
    for src, cands in zip(sources, wm.sample(sources, ACTIONS, n=1, seed=0), strict=True):
        assert parse_scene(decode_image(src), ToyWorldConfig()) == parse_scene(cands[0], ToyWorldConfig())
    # The same weights without the prior: the loss of a target equal to its source is the prior's to lower.
    wm.save(str(plain_path))
    config = json.loads((plain_path / "config.json").read_text())
    (plain_path / "config.json").write_text(json.dumps(config | {"source_copy_logit": 0.0}))
    plain = _load(str(plain_path))
    assert plain.module.copy_logit == 0.0
    batch = {k: v for k, v in wm.collate(_batch()).items() if k != "weights"}
    batch["target_codes"] = batch["source_codes"]
    with torch.no_grad():
        prior, without = float(wm.module(**batch)), float(plain.module(**batch))
    assert prior < 0.1 < without, (prior, without)


def test_source_fusion_feeds_each_position_its_source_code_in_the_loss_and_the_sampler(tmp_path: Path) -> None:
    """`source_fusion` in the Janus config adds each target position's own source code embedding to its input.
    Greedy sampling must then draw exactly the teacher-forced argmax at every cell (the two paths see the same
    inputs), and the fusion must change what the model predicts (it is applied, not just configured)."""
    import json

    path, plain_path = tmp_path / "fused", tmp_path / "plain"
    build_toy_token_world_model(str(path), seed=0, source_fusion=1.0, **TINY)
    wm = _load(str(path))
    assert wm.module.source_fusion == 1.0
    wm.cfg.token.temperature = 0.0
    sources, actions = _images(3, 4), ACTIONS
    drawn = wm.codes([cands[0] for cands in wm.sample(sources, actions, n=1, seed=0)])
    source = wm.codes(sources)
    ids, mask = wm._tokenize_text(actions)
    with torch.no_grad():
        logits = wm.module.eval().target_logits(source, drawn, ids, mask)
    assert torch.equal(logits.argmax(-1), drawn)
    wm.save(str(plain_path))
    config = json.loads((plain_path / "config.json").read_text())
    (plain_path / "config.json").write_text(json.dumps(config | {"source_fusion": 0.0}))
    plain = _load(str(plain_path))
    assert plain.module.source_fusion == 0.0
    with torch.no_grad():
        assert not torch.allclose(plain.module.eval().target_logits(source, drawn, ids, mask), logits)
