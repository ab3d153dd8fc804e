"""The whole UniToken forward and loss against a PyTorch computation built the way the reference's
`forward` builds it: token embeddings, then for each image SEP and adapter(vit(image)) inserted
before its <eoss>, as `inputs_embeds` into transformers' Chameleon; loss = mean cross-entropy
over the shifted labelled positions plus z_loss_weight * mean(logsumexp^2) over the same ones."""

import numpy as np
import pytest
import torch

import oracles
import unitoken_jax

BREAK = 8197
T_IMG = 16  # 56x56 pixels / 14-pixel patches


def _image_span(rng, n_codes=6):
    """<racm3:break> H W codes... <eoss> as discrete ids (a toy grid; the layout is the tokenizer's job)."""
    return [BREAK, 8805, 8805] + list(rng.integers(4, 8196, n_codes)) + [oracles.EOSS]


def _sample(rng, n_images, predict_image):
    """(discrete ids, labels, image ids used in order); the last turn is predicted."""
    ids, labels = [], []
    for _ in range(n_images):
        prompt = list(rng.integers(8900, 8960, 3))
        ids += prompt
        labels += [-100] * len(prompt)
        span = _image_span(rng)
        ids += span
        labels += span if predict_image else [-100] * len(span)
    answer = list(rng.integers(8900, 8960, 4)) + [8710]
    ids += answer
    labels += answer
    return ids, labels


def _reference_torch(chameleon, siglip, adapter, ids, labels, images):
    """Per sample: the reference's sequence construction generalised to any number of images."""
    emb = chameleon.model.embed_tokens
    with torch.no_grad():
        feats = adapter(siglip(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state) \
            if len(images) else None
        pieces, lab, start, k = [], [], 0, 0
        ids_t = torch.tensor(ids)
        for pos in [i for i, t in enumerate(ids) if t == oracles.EOSS]:
            pieces += [emb(ids_t[start:pos]), emb(torch.tensor([oracles.SEP])), feats[k]]
            lab += labels[start:pos] + [oracles.SEP] + [-100] * T_IMG
            start, k = pos, k + 1
        pieces.append(emb(ids_t[start:]))
        lab += labels[start:]
        x = torch.cat(pieces)[None]
        return oracles.hf_logits(chameleon, inputs_embeds=x)[0], np.array(lab)


def _ours(ids, labels, first_feature):
    """Our static-shape row: SEP + T_IMG continuous slots before each <eoss>."""
    tokens, lab, cont, index = [], [], [], []
    k = first_feature
    for t, y in zip(ids, labels):
        if t == oracles.EOSS:
            tokens += [oracles.SEP] + [0] * T_IMG
            lab += [oracles.SEP] + [-100] * T_IMG
            cont += [False] + [True] * T_IMG
            index += [0] + list(range(k, k + T_IMG))
            k += T_IMG
        tokens.append(t)
        lab.append(y)
        cont.append(False)
        index.append(0)
    return tokens, lab, cont, index


def _pad(rows, length, value):
    return np.array([r + [value] * (length - len(r)) for r in rows])


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    path = tmp_path_factory.mktemp("unitoken")
    chameleon = oracles.make_chameleon(seed=11, mp=2)
    siglip = oracles.make_siglip(seed=12)
    adapter = oracles.make_adapter(32, 64, seed=13)
    oracles.write_unitoken(path, chameleon, siglip, adapter, layout="lumina", shards=3, z_loss_weight=1e-2)
    return unitoken_jax.load(str(path)), chameleon, siglip, adapter


def test_forward_and_loss_match_reference_for_0_1_2_images(release):
    model, chameleon, siglip, adapter = release
    assert model.config.z_loss_weight == 1e-2
    rng = np.random.default_rng(0)
    image_counts, predict = [0, 1, 2, 1], [False, False, True, True]  # understanding and generation rows
    images = torch.randn(sum(image_counts), 3, 56, 56, generator=torch.Generator().manual_seed(3))

    rows, ref_logits, ref_labels, first = [], [], [], 0
    for n, gen in zip(image_counts, predict):
        ids, labels = _sample(rng, n, gen)
        logits, lab = _reference_torch(chameleon, siglip, adapter, ids, labels, images[first:first + n])
        ref_logits.append(logits)
        ref_labels.append(lab)
        rows.append(_ours(ids, labels, first * T_IMG))
        first += n

    length = max(len(r[0]) for r in rows) + 3
    tokens = _pad([r[0] for r in rows], length, 0)
    labels = _pad([r[1] for r in rows], length, -100)
    cont = _pad([r[2] for r in rows], length, False)
    index = _pad([r[3] for r in rows], length, 0)
    segments = _pad([[1] * len(r[0]) for r in rows], length, 0)
    logits, metrics = model.forward(tokens, labels=labels, segment_ids=segments, is_continuous=cont,
                                    feature_index=index, pixels=images.permute(0, 2, 3, 1).numpy())
    logits = np.asarray(logits)
    for b, ref in enumerate(ref_logits):
        np.testing.assert_allclose(logits[b, :len(ref)], ref, atol=2e-4, rtol=0)
        np.testing.assert_array_equal(labels[b, :len(ref)], ref_labels[b])

    # The loss as the reference computes it: torch CrossEntropyLoss(mean) over the shifted labels
    # of all rows, plus the z-loss on the same shifted positions.
    shift_logits = torch.cat([torch.from_numpy(lg[:-1]) for lg in ref_logits])
    shift_labels = torch.cat([torch.from_numpy(lb[1:]) for lb in ref_labels])
    ce = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
    valid = shift_labels >= 0
    z = torch.logsumexp(shift_logits, dim=-1).pow(2)[valid].mean()
    np.testing.assert_allclose(float(metrics["ce"]), ce.item(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["z_loss"]), z.item(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), ce.item() + 1e-2 * z.item(), rtol=1e-5)
    assert int(metrics["tokens"]) == int(valid.sum())

    # Understanding / generation split: generation targets are the image-span tokens and SEP, but
    # not the SEP of a picture given as input (the label before it is ignored: none of it is drawn).
    before = torch.cat([torch.from_numpy(lb[:-1]) for lb in ref_labels])
    is_gen = valid & (((shift_labels >= 4) & (shift_labels < 8199)) | ((shift_labels >= 8803) & (shift_labels < 8900)))
    is_gen &= ~((shift_labels == 8198) & (before < 0))
    per_token = torch.nn.functional.cross_entropy(shift_logits, shift_labels.clamp(min=0), reduction="none")
    np.testing.assert_allclose(float(metrics["ce_generation"]), per_token[is_gen].mean().item(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ce_understanding"]), per_token[valid & ~is_gen].mean().item(), rtol=1e-5)
    assert int(metrics["tokens_generation"]) == int(is_gen.sum()) > 0


def test_packed_row_equals_separate_rows(release):
    model = release[0]
    rng = np.random.default_rng(5)
    a, b = rng.integers(8900, 8960, 7), rng.integers(8900, 8960, 5)
    packed = np.concatenate([a, b, [0, 0]])[None]
    segments = np.array([[1] * 7 + [2] * 5 + [0, 0]])
    positions = np.array([list(range(7)) + list(range(5)) + [0, 0]])
    logits, _ = model.forward(packed, segment_ids=segments, positions=positions)
    alone_a = np.asarray(model.text_logits(a[None]))[0]
    alone_b = np.asarray(model.text_logits(b[None]))[0]
    np.testing.assert_allclose(np.asarray(logits)[0, :7], alone_a, atol=2e-5)
    np.testing.assert_allclose(np.asarray(logits)[0, 7:12], alone_b, atol=2e-5)

    # The loss never predicts across the boundary: labelling only b's first token gives no target.
    labels = np.full_like(packed, -100)
    labels[0, 7] = b[0]
    _, metrics = model.forward(packed, segment_ids=segments, positions=positions, labels=labels)
    assert int(metrics["tokens"]) == 0


def test_bad_multimodal_inputs_are_refused(release):
    model = release[0]
    tokens = np.zeros((1, 20), np.int32)
    cont = np.zeros((1, 20), bool)
    cont[0, 2:5] = True
    with pytest.raises(ValueError, match="no pixels"):
        model.forward(tokens, is_continuous=cont, feature_index=np.zeros((1, 20), np.int32))
    with pytest.raises(ValueError, match="outside 0..15"):
        model.forward(tokens, is_continuous=cont, feature_index=np.full((1, 20), 16),
                      pixels=np.zeros((1, 56, 56, 3), np.float32))


def test_an_encoded_item_runs_through_the_model(release, tmp_path):
    """Tokenizer output (ids, labels, slots, SigLIP pixels) fits the model's forward as it is."""
    import tokenizer_fixture
    from PIL import Image
    from skimage import data as skdata

    from unitoken_jax.models.vqgan import VQGANConfig
    from unitoken_jax.tokenizer.conversation import encode_item
    from unitoken_jax.tokenizer.text import TextTokenizer
    from unitoken_jax.vq_tokenizer import VQTokenizer

    model = release[0]
    tok = TextTokenizer(tokenizer_fixture.build())
    vq = VQTokenizer.random(VQGANConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, embed_dim=8))
    Image.fromarray(skdata.rocket()).save(tmp_path / "rocket.png")
    item = {"conversations": [{"from": "human", "value": "<|image|>the"}, {"from": "gpt", "value": "he <|image|>"}],
            "image": ["rocket.png", "rocket.png"]}
    # the tiny test tower has 14-px patches: 56-px SigLIP inputs give 16 features per image
    enc, pixels = encode_item(item, tok, vq, image_root=str(tmp_path), vq_size=32, siglip_size=56)
    tokens = np.minimum(enc.tokens, oracles.VOCAB - 1)  # the tiny decoder's vocabulary ends at 8959
    labels = np.where(enc.labels >= 0, np.minimum(enc.labels, oracles.VOCAB - 1), -100)
    logits, metrics = model.forward(tokens[None], labels=labels[None], is_continuous=enc.is_continuous[None],
                                    feature_index=enc.feature_index[None], pixels=pixels)
    # the loss of the encoded item, from the logits by the formula (next-token CE + z-loss on the
    # labelled positions), split by what the target is
    lg = np.asarray(logits, np.float64)[0, :-1]
    target = labels[1:]
    valid = target >= 0
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    ce = lse - lg[np.arange(len(target)), np.maximum(target, 0)]
    expected = ce[valid].mean() + model.config.z_loss_weight * (lse[valid] ** 2).mean()
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-4)
    image_target = valid & (((target >= 4) & (target <= 8198)) | ((target >= 8803) & (target < 8900)))
    # the SEP of the user's picture is labelled (as the reference does) but nothing of that picture
    # is drawn: it counts as understanding; the answer's picture, SEP included, as generation
    given_sep = valid & (target == 8198) & (labels[:-1] < 0)
    assert given_sep.sum() == 1
    assert int(metrics["tokens_generation"]) == (image_target & ~given_sep).sum() > 0
    assert int(metrics["tokens_understanding"]) == (valid & ~image_target).sum() + 1
