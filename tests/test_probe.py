"""Frozen-feature evaluation: k-NN, linear probe, datasets and the `arlow probe` command end to end."""

import copy
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import arlow  # noqa: F401
from arlow.cli import main
from arlow.evaluation import (
    LinearProbeConfig,
    extract_features,
    knn_accuracy,
    knn_predict,
    labelled_images,
    load_encoder,
    probe_accuracy,
    probe_encoder,
    random_encoder,
    stratified_split,
    train_linear_probe,
)
from arlow.evaluation.features import batch_rows, image_rows
from arlow.modeling.vision import ArlowVLVisionModel

RES = 56  # 4 x 4 patches = 4 merged tokens per image


# ---------------------------------------------------------------------------------------------------------------
# synthetic features


def blobs(n_per_class=60, classes=3, dim=16, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return feats[perm], labels[perm]


def halves(feats, labels):
    n = len(labels) * 2 // 3
    return feats[:n], labels[:n], feats[n:], labels[n:]


def test_knn_matches_a_direct_implementation_and_separates_blobs():
    xtr, ytr, xte, yte = halves(*blobs())
    scores = knn_predict(xtr, ytr, xte, 3, k=20, temperature=0.07)
    # independent: one test item at a time, explicit cosine, explicit vote
    for i in range(0, len(xte), 7):
        sims = torch.tensor([float(xte[i] @ xtr[j] / (xte[i].norm() * xtr[j].norm())) for j in range(len(xtr))])
        top = sims.argsort(descending=True)[:20]
        votes = torch.zeros(3)
        for j in top:
            votes[ytr[j]] += torch.exp(sims[j] / 0.07)
        torch.testing.assert_close(scores[i], votes, rtol=1e-4, atol=0)
    assert knn_accuracy(xtr, ytr, xte, yte, 3) >= 0.98


def test_linear_probe_separates_blobs_and_shuffled_labels_stay_near_chance():
    xtr, ytr, xte, yte = halves(*blobs())
    cfg = LinearProbeConfig(epochs=30, batch_size=32)
    assert probe_accuracy(train_linear_probe(xtr, ytr, 3, cfg), xte, yte) >= 0.98
    # labels independent of the features: nothing to learn, test accuracy near 1/3 for both methods
    shuffled = torch.randperm(len(ytr) + len(yte), generator=torch.Generator().manual_seed(1))
    y_all = torch.cat([ytr, yte])[shuffled]
    ytr_s, yte_s = y_all[: len(ytr)], y_all[len(ytr):]
    assert knn_accuracy(xtr, ytr_s, xte, yte_s, 3) < 0.55
    assert probe_accuracy(train_linear_probe(xtr, ytr_s, 3, cfg), xte, yte_s) < 0.55


def test_linear_probe_is_deterministic_for_a_seed_and_leaves_global_rng_alone():
    xtr, ytr, _, _ = halves(*blobs(spread=2.0))
    state = torch.random.get_rng_state()
    a = train_linear_probe(xtr, ytr, 3, LinearProbeConfig(epochs=5, batch_size=16, seed=3))
    b = train_linear_probe(xtr, ytr, 3, LinearProbeConfig(epochs=5, batch_size=16, seed=3))
    c = train_linear_probe(xtr, ytr, 3, LinearProbeConfig(epochs=5, batch_size=16, seed=4))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.head.weight, c.head.weight)
    assert a.norm.weight is None  # BatchNorm without affine parameters, as MAE's linprobe


def test_stratified_split_is_seeded_disjoint_and_proportional():
    names = ["a"] * 50 + ["b"] * 30 + ["c"] * 1
    train, test = stratified_split(names, 0.2, seed=0)
    again, _ = stratified_split(names, 0.2, seed=0)
    other, _ = stratified_split(names, 0.2, seed=1)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    assert set(train) | set(test) == set(range(len(names))) and not set(train) & set(test)
    assert [names[i] for i in test].count("a") == 10 and [names[i] for i in test].count("b") == 6
    assert 80 in train  # a single-item class stays in training


# ---------------------------------------------------------------------------------------------------------------
# images and encoders


def digit_like(kind: int, seed: int) -> Image.Image:
    """Class 0: a bright horizontal bar; class 1: a vertical bar; jittered position and noise."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 40, (40, 40, 3)).astype(np.uint8)
    offset = int(rng.integers(8, 28))
    if kind == 0:
        a[offset:offset + 6, 4:36] = (250, 60, 60)
    else:
        a[4:36, offset:offset + 6] = (60, 60, 250)
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("classes")
    for kind, name in enumerate(("horizontal", "vertical")):
        (root / name).mkdir()
        for i in range(8):
            digit_like(kind, 100 * kind + i).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def config_json(tiny_config, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(tiny_config("encoder").to_json_string())
    return path


@pytest.fixture(scope="module")
def exported(tiny_config, tmp_path_factory):
    torch.manual_seed(5)
    model = ArlowVLVisionModel(tiny_config("encoder")).eval()
    checkpoint = tmp_path_factory.mktemp("ckpt") / "checkpoint-7"
    model.save_pretrained(checkpoint / "vision_encoder")
    return model, checkpoint


def test_batched_rows_equal_one_image_at_a_time(tiny_config):
    config = tiny_config("encoder")
    images = [digit_like(i % 2, i) for i in range(5)] + [Image.new("RGB", (70, 30), (10, 200, 30))]
    rows, grids = batch_rows(images, config, RES)
    singles = [image_rows(im, config, RES) for im in images]
    assert torch.equal(rows, torch.cat([r for r, _ in singles]))
    assert torch.equal(grids, torch.stack([g for _, g in singles]))


def test_exported_encoder_and_checkpoint_load_with_identical_features(tiny_config, exported, folder):
    model, checkpoint = exported
    data = labelled_images(folder)
    ref = extract_features(model, data, RES, batch_size=5, feature="deepstack", progress=False)
    for path in (checkpoint, checkpoint / "vision_encoder"):
        loaded, where = load_encoder(path)
        assert where.endswith("vision_encoder")
        feats = extract_features(loaded, data, RES, batch_size=16, feature="deepstack", progress=False)
        torch.testing.assert_close(feats.features, ref.features, rtol=1e-5, atol=1e-6)
    hidden = tiny_config("encoder").hidden_size
    assert ref.features.shape == (16, 2 * hidden)  # merged mean + one DeepStack level
    # the first half of the deepstack feature is the plain feature
    plain = extract_features(model, data, RES, feature="merged", progress=False)
    torch.testing.assert_close(ref.features[:, :hidden], plain.features, rtol=1e-5, atol=1e-6)


def test_random_init_from_config_is_seeded(config_json, exported):
    a, _ = random_encoder(config_json, seed=1)
    b, _ = random_encoder(config_json, seed=1)
    c, _ = random_encoder(config_json, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.patch_embed.proj.weight, c.patch_embed.proj.weight)
    shapes = {k: v.shape for k, v in exported[0].state_dict().items()}
    assert {k: v.shape for k, v in a.state_dict().items()} == shapes


# ---------------------------------------------------------------------------------------------------------------
# `arlow probe` end to end, each dataset form


def run_probe(args, tmp_path, capsys):
    out = tmp_path / "result.json"
    code = main(["probe", *args, "--resolution", str(RES), "--epochs", "10", "--no-progress", "--output", str(out)])
    stdout = capsys.readouterr().out
    return code, (json.loads(out.read_text()) if out.is_file() else None), stdout


def test_cli_class_folders_random_init(tiny_config, folder, config_json, tmp_path, capsys):
    code, result, stdout = run_probe(["--random-init", str(config_json), "--dataset", str(folder),
                                      "--test-fraction", "0.25"], tmp_path, capsys)
    assert code == 0
    assert result["num_train"] == 12 and result["num_test"] == 4 and result["num_classes"] == 2
    assert result["classes"] == ["horizontal", "vertical"]
    # the default feature of an encoder with DeepStack levels: the merged mean and each level's mean
    assert result["feature"] == "deepstack" and result["feature_dim"] == 2 * tiny_config("encoder").hidden_size
    assert 0.0 <= result["knn"]["top1"] <= 1.0 and 0.0 <= result["linear"]["top1"] <= 1.0
    assert result["linear"]["train_top1"] == 1.0  # 12 points in 32 dimensions are linearly separable
    assert stdout.startswith("probe: k-NN (k=20) top-1") and "12 train / 4 test" in stdout
    # same seed, same everything
    code, again, _ = run_probe(["--random-init", str(config_json), "--dataset", str(folder), "--test-fraction",
                                "0.25"], tmp_path, capsys)
    assert again["knn"] == result["knn"] and again["linear"] == result["linear"]


def test_cli_saved_datasets_folder_and_given_splits(tiny_config, folder, exported, tmp_path, capsys):
    import datasets

    images = [digit_like(i % 2, 500 + i) for i in range(10)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["h", "v"])})
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(10)]}, features=features)
    ds.save_to_disk(str(tmp_path / "hf"))
    code, result, _ = run_probe([str(exported[1]), "--dataset", str(tmp_path / "hf"), "--deepstack"], tmp_path,
                                capsys)
    assert code == 0 and result["num_train"] + result["num_test"] == 10 and result["classes"] == ["h", "v"]
    assert result["feature_dim"] == 2 * tiny_config("encoder").hidden_size
    assert result["encoder"].endswith("vision_encoder")

    # given split folders: the class names line up
    code, result, _ = run_probe([str(exported[1]), "--train", str(folder), "--test", str(folder), "--k", "1"],
                                tmp_path, capsys)
    assert code == 0 and result["num_train"] == result["num_test"] == 16 and result["knn"]["k"] == 1
    assert result["knn"]["top1"] == 1.0  # with k=1 every test image is its own nearest training neighbour


def test_cli_csv_with_header_relative_paths_and_a_bad_file(folder, config_json, tmp_path, capsys, caplog):
    lines = ["path,label"]
    for name in ("horizontal", "vertical"):
        for f in sorted((folder / name).iterdir()):
            lines.append(f"{f},{name}")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    lines.append("broken.png,vertical")  # relative to the CSV's folder
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="arlow.evaluation"):
        code, result, stdout = run_probe(["--random-init", str(config_json), "--dataset", str(tmp_path / "data.csv")],
                                         tmp_path, capsys)
    assert code == 0
    assert result["num_skipped"] == 1 and "broken.png" in result["skipped"][0]["file"]
    assert result["num_train"] + result["num_test"] == 16 and "1 skipped" in stdout
    assert any("skipped 1 unreadable" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------------------
# clear errors


def test_errors_not_an_encoder(folder, tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    for bad in (tmp_path / "other", folder, tmp_path / "missing"):
        with pytest.raises(ValueError, match="vision_encoder|not a vision encoder|not a directory"):
            load_encoder(bad)
    assert main(["probe", str(tmp_path / "other"), "--dataset", str(folder), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is not a vision encoder" in err and "model_type 'arlow_vision'" in err and "'bert'" in err


def test_usage_errors_name_the_cli_flags(folder, config_json, capsys):
    assert main(["probe", "--dataset", str(folder), "--no-progress"]) == 2
    assert "ENCODER folder (encoder=) and --random-init" in capsys.readouterr().err
    assert main(["probe", "--random-init", str(config_json), "--train", str(folder), "--no-progress"]) == 2
    assert "either --dataset (dataset=, split with --seed) or both --train and --test" in capsys.readouterr().err


def test_errors_one_class_empty_and_unreadable(config_json, tmp_path):
    one = tmp_path / "one" / "only"
    one.mkdir(parents=True)
    for i in range(4):
        digit_like(0, i).save(one / f"{i}.png")
    with pytest.raises(ValueError, match="single class"):
        probe_encoder(random_init=str(config_json), dataset=one.parent, resolution=RES, progress=False)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        probe_encoder(random_init=str(config_json), dataset=tmp_path / "empty", resolution=RES, progress=False)
    (tmp_path / "empty.csv").write_text("path,label\n")
    with pytest.raises(ValueError, match="lists no images"):
        probe_encoder(random_init=str(config_json), dataset=tmp_path / "empty.csv", resolution=RES, progress=False)

    bad = tmp_path / "bad"
    for name in ("a", "b"):
        (bad / name).mkdir(parents=True)
        for i in range(3):
            (bad / name / f"{i}.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="none of the .* images could be read"):
        probe_encoder(random_init=str(config_json), dataset=bad, resolution=RES, progress=False)

    flat = tmp_path / "flat"
    flat.mkdir()
    digit_like(0, 0).save(flat / "x.png")
    with pytest.raises(ValueError, match="not in class folders"):
        labelled_images(flat)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        probe_encoder(random_init=str(config_json), dataset=one.parent.parent / "bad", resolution=50, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# effective rank, pooled features, fine-tuning


def test_effective_rank_counts_equal_directions_and_weights_unequal_ones():
    from arlow.evaluation import effective_rank

    g = torch.Generator().manual_seed(0)
    n, dim = 40, 12
    # k orthonormal, centred item directions times k orthonormal feature directions: singular values all 1
    centred = torch.randn(n, 5, generator=g, dtype=torch.float64)
    left = torch.linalg.qr(centred - centred.mean(dim=0))[0]
    right = torch.linalg.qr(torch.randn(dim, 5, generator=g, dtype=torch.float64))[0].T
    offset = torch.randn(1, dim, generator=g, dtype=torch.float64) * 10  # a shared mean does not count
    for k in (1, 3, 5):
        assert effective_rank(left[:, :k] @ right[:k] + offset) == pytest.approx(k, rel=1e-9)
    # singular values (3, 1): p = (0.75, 0.25), exp(entropy) computed by hand
    expected = float(np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))))
    x = left[:, :2] @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ right[:2]
    assert effective_rank(x) == pytest.approx(expected, rel=1e-9)
    assert effective_rank(torch.ones(4, 3)) == 1.0
    with pytest.raises(ValueError, match="n >= 2"):
        effective_rank(torch.ones(1, 3))


def test_pooled_features_of_pixels_match_extract_features_and_blocks_reads_the_last_block(exported, folder):
    from arlow.evaluation.features import image_pixels, pooled_features

    model = exported[0]
    data = labelled_images(folder)
    pixels = image_pixels(data, RES)
    with torch.no_grad():
        for feature in ("merged", "deepstack", "blocks"):
            ref = extract_features(model, data, RES, feature=feature, progress=False).features
            torch.testing.assert_close(pooled_features(model, pixels, feature), ref, rtol=1e-5, atol=1e-6)
        rows, grid = batch_rows([data.source.load(int(i)) for i in data.indices[:2]], model.config, RES)
        last = model(rows, grid, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(pooled_features(model, pixels[:2], "blocks"),
                                   last.view(2, -1, last.shape[-1]).mean(dim=1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="feature must be one of"):
        extract_features(model, data, RES, feature="cls", progress=False)


def test_default_feature_is_deepstack_where_the_encoder_has_levels_else_merged(tiny_config, exported, folder):
    from arlow.evaluation.features import default_feature, image_pixels, pooled_features

    pixels = image_pixels(labelled_images(folder), RES)[:3]
    torch.manual_seed(0)
    flat = ArlowVLVisionModel(tiny_config("encoder", deepstack_visual_indexes=[])).eval()
    hidden = tiny_config("encoder").hidden_size
    with torch.no_grad():
        for model, expected in ((exported[0], "deepstack"), (flat, "merged")):
            assert default_feature(model.config) == expected
            torch.testing.assert_close(pooled_features(model, pixels), pooled_features(model, pixels, expected))
    assert pooled_features(exported[0], pixels).shape == (3, 2 * hidden)
    assert pooled_features(flat, pixels).shape == (3, hidden)


def test_finetune_learns_bars_leaves_the_encoder_alone_and_is_seeded(exported, folder):
    from arlow.evaluation import FinetuneConfig, finetune_accuracy
    from arlow.evaluation.features import image_pixels

    model = exported[0]
    data = labelled_images(folder)
    x = image_pixels(data, RES)
    y = torch.tensor([0 if n == "horizontal" else 1 for n in data.names])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = FinetuneConfig(epochs=15, batch_size=8, learning_rate=2e-3, seed=3)
    first = finetune_accuracy(model, x, y, x, y, 2, config)
    again = finetune_accuracy(model, x, y, x, y, 2, config)
    assert first["train_top1"] == 1.0 and first["top1"] == again["top1"] == 1.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # trained a copy
    with pytest.raises(ValueError, match="labels must lie"):
        finetune_accuracy(model, x, y + 1, x, y, 2, config)


def test_partial_finetuning_trains_only_the_last_blocks_and_what_follows(tiny_config, folder):
    from arlow.evaluation import FinetuneConfig, finetune_accuracy
    from arlow.evaluation.features import image_pixels, pooled_features
    from arlow.evaluation.finetune import freeze_all_but_last_blocks

    config = tiny_config("encoder", depth=3, use_progressive_patches=True, num_position_embeddings=16)
    model = ArlowVLVisionModel(config).eval()
    x = image_pixels(labelled_images(folder), RES)
    y = torch.tensor([0 if n == "horizontal" else 1 for n in labelled_images(folder).names])
    stem = ("patch_embed.", "pos_embed.", "progressive_proj.", "blocks.0.", "blocks.1.")
    expected = {name for name, _ in model.named_parameters() if name.startswith(stem)}
    assert any(n.startswith("pos_embed.") for n in expected) and any(n.startswith("progressive_proj.") for n in expected)

    partial = copy.deepcopy(model)
    assert set(freeze_all_but_last_blocks(partial, 1)) == expected
    pooled_features(partial, x[:4]).square().sum().backward()
    for name, parameter in partial.named_parameters():  # gradients reach exactly the trainable parameters
        assert (parameter.grad is None) == (name in expected), name

    dim = pooled_features(model, x[:1]).shape[1]
    head = 2 * dim + dim * 2 + 2  # LayerNorm + Linear(dim, 2 classes)
    trainable = sum(p.numel() for n, p in model.named_parameters() if n not in expected)
    cfg = dict(epochs=2, batch_size=8, learning_rate=2e-3, seed=1)
    tuned = finetune_accuracy(model, x, y, x, y, 2, FinetuneConfig(**cfg, last_blocks=1))
    full = finetune_accuracy(model, x, y, x, y, 2, FinetuneConfig(**cfg))
    assert tuned["trainable_parameters"] == trainable + head and tuned["config"]["last_blocks"] == 1
    assert full["trainable_parameters"] == sum(p.numel() for p in model.parameters()) + head
    assert all(p.requires_grad for p in model.parameters())  # the caller's encoder is left alone

    with pytest.raises(ValueError, match=r"last_blocks must lie in \[0, 3\]"):
        freeze_all_but_last_blocks(copy.deepcopy(model), 4)
    with pytest.raises(ValueError, match="needs an encoder with `blocks`, `layers` or `encoder.layer`"):
        freeze_all_but_last_blocks(torch.nn.Linear(2, 2), 0)


def test_partial_finetuning_finds_the_blocks_of_transformers_vit_encoders():
    from transformers import ViTMAEConfig, ViTMAEModel

    from arlow.evaluation.finetune import freeze_all_but_last_blocks

    model = ViTMAEModel(ViTMAEConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=32, image_size=8, patch_size=4))
    blocks = model.layers if hasattr(model, "layers") else model.encoder.layer  # transformers >= 5.2x / older
    first = {id(p) for p in [*model.embeddings.parameters(), *blocks[0].parameters()]}
    frozen = freeze_all_but_last_blocks(model, 2)
    assert sorted(frozen) == sorted(n for n, p in model.named_parameters() if id(p) in first)
    assert all(p.requires_grad == (id(p) not in first) for p in model.parameters())
    assert model.layernorm.weight.requires_grad and next(blocks[2].parameters()).requires_grad


@pytest.mark.parametrize("partial", [[], ["--finetune-last-blocks", "1"]], ids=["full", "last-block"])
def test_cli_reports_feature_rank_and_finetuning(tiny_config, folder, config_json, tmp_path, capsys, partial):
    from arlow.evaluation import effective_rank

    code, result, stdout = run_probe(["--random-init", str(config_json), "--dataset", str(folder), "--test-fraction",
                                      "0.5", "--feature", "blocks", "--finetune", "--finetune-epochs", "2", *partial],
                                     tmp_path, capsys)
    assert code == 0 and result["feature"] == "blocks" and result["feature_dim"] == tiny_config("encoder").embed_dim
    model, _ = random_encoder(config_json, seed=0)
    test = labelled_images(folder).select(stratified_split(labelled_images(folder).names, 0.5, 0)[1])
    feats = extract_features(model, test, RES, feature="blocks", progress=False).features
    assert result["feature_rank"] == pytest.approx(effective_rank(feats), rel=1e-6)
    assert f"(effective rank {result['feature_rank']:.1f})" in stdout and "fine-tuned top-1" in stdout
    assert result["finetune"]["epochs"] == 2 and 0.0 <= result["finetune"]["top1"] <= 1.0
    assert result["finetune"]["last_blocks"] == (1 if partial else None)
    assert ("last 1 blocks fine-tuned top-1" in stdout) == bool(partial)


def test_cli_refuses_partial_finetuning_without_finetune(config_json, folder, tmp_path, capsys):
    code = main(["probe", "--random-init", str(config_json), "--dataset", str(folder), "--finetune-last-blocks", "1",
                 "--output", str(tmp_path / "r.json")])
    assert code == 2 and "add --finetune" in capsys.readouterr().err and not (tmp_path / "r.json").exists()
