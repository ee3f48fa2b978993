import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fseft.cli import main
from fseft.data.io import write_image, write_mask
from fseft.data.volume import Volume
from fseft.pretraining import (
    AssemblyConfig,
    PretrainConfig,
    assembly_from_dict,
    load_assembly,
    pretrain,
    resolve_sources,
)
from fseft.training.sampling import EpochPatchDataset, class_balanced_group_weights, patch_transforms
from fseft.errors import ConfigError, InputFileError
from fseft.utils import write_json
from tiny_cases import tiny_assembly, write_partial_label_dataset

def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------------------- configuration


def test_load_assembly_resolves_paths_and_catalogue(tmp_path):
    data = tiny_assembly(tmp_path)
    assembly = load_assembly(write_yaml(tmp_path / "a.yaml", data), overrides={"epochs": 5, "device": None})
    assert isinstance(assembly, AssemblyConfig) and isinstance(assembly.train, PretrainConfig)
    assert assembly.datasets[0].path == tmp_path / "A"
    assert assembly.train.epochs == 5 and assembly.train.patch_size == (16, 16, 16)
    catalogue, sources = resolve_sources(assembly)
    # union in order of appearance; B lists nothing, so it annotates all its label map names
    assert catalogue == ("liver", "spleen", "kidney_left")
    assert [s.structures for s in sources] == [("liver", "spleen"), ("spleen", "kidney_left")]


@pytest.mark.parametrize("section,key,suggestion", [
    ("train", "epoch", "epochs"),
    ("datasets", "structrues", "structures"),
    ("model", "arch_kwarg", "arch_kwargs"),
    ("top", "preprocesing", "preprocess"),
])
def test_unknown_key_names_key_file_and_closest(tmp_path, section, key, suggestion):
    data = tiny_assembly(tmp_path)
    if section == "top":
        data[key] = {}
    elif section == "datasets":
        data["datasets"][0][key] = ["liver"]
    else:
        data[section][key] = 1
    path = write_yaml(tmp_path / "a.yaml", data)
    with pytest.raises(ConfigError) as err:
        load_assembly(path)
    msg = str(err.value)
    assert repr(key) in msg and str(path) in msg and f"did you mean {suggestion!r}" in msg


def test_bad_values_and_missing_dataset_are_config_errors(tmp_path):
    data = tiny_assembly(tmp_path)
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        assembly_from_dict(data, base_dir=tmp_path, overrides={"epochs": 0})
    with pytest.raises(ConfigError, match="patch_size"):
        assembly_from_dict(data, base_dir=tmp_path, overrides={"patch_size": [16, 16]})
    with pytest.raises(ConfigError, match="unknown key 'epoch'.*'epochs'"):
        assembly_from_dict(data, base_dir=tmp_path, overrides={"epoch": 3})
    with pytest.raises(ConfigError, match="soft_labels must be true or false"):
        assembly_from_dict(data, base_dir=tmp_path, overrides={"soft_labels": "yes"})
    data["datasets"].append({"path": "nowhere"})
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nowhere'} does not exist"):
        assembly_from_dict(data, base_dir=tmp_path)


def test_dataset_errors_before_training(tmp_path, monkeypatch):
    data = tiny_assembly(tmp_path)
    data["datasets"][1]["structures"] = ["kidney_left", "liver"]  # B has no liver label
    with pytest.raises(ConfigError, match="does not annotate liver"):
        resolve_sources(assembly_from_dict(data, base_dir=tmp_path))

    data = tiny_assembly(tmp_path)
    data["model"]["classes"] = ["liver"]
    data["datasets"][1]["structures"] = ["kidney_left"]
    with pytest.raises(ConfigError, match="'B' annotates none of the catalogue classes"):
        resolve_sources(assembly_from_dict(data, base_dir=tmp_path))

    # a label-map override that leaves a value of the label files unmapped
    data = tiny_assembly(tmp_path)
    data["datasets"][1]["label_map"] = {1: "kidney_left"}
    with pytest.raises(InputFileError, match=r"label value\(s\) \[2\] are not in the label map"):
        pretrain(assembly_from_dict(data, base_dir=tmp_path), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()

    # bf16 on a CPU where the U-Net sees the 16-deep patch 2 voxels deep (`check_bf16_training`)
    from fseft.inference import sliding_window

    monkeypatch.setattr(sliding_window, "cpu_bf16_conv3d_gradient_is_wrong", lambda: True)
    data = tiny_assembly(tmp_path, bf16=True, device="cpu")
    with pytest.raises(ConfigError, match=r"train.patch_size \[16, 16, 16\]: bf16 training on a CPU"):
        pretrain(assembly_from_dict(data, base_dir=tmp_path), tmp_path / "run_bf16")
    assert not (tmp_path / "run_bf16").exists()


def test_cli_reports_config_errors(tmp_path, capsys):
    data = tiny_assembly(tmp_path)
    data["train"]["warmup_epoch"] = 1
    path = write_yaml(tmp_path / "a.yaml", data)
    assert main(["pretrain", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count(str(path)) == 1 and "'warmup_epoch'" in err and "did you mean 'warmup_epochs'" in err


# ---------------------------------------------------------------------------- sampling


def _volume(c=2, shape=(12, 14, 10)):
    label = torch.zeros((c, *shape), dtype=torch.uint8)
    label[0, 2:4, 3:5, 2:4] = 1
    return {"image": torch.rand(1, *shape), "label": label, "annotated": torch.tensor([True, False])}


def test_patches_shapes_positive_sampling_and_reproducibility():
    transform = patch_transforms((16, 8, 8), patches_per_volume=3, pos=1, neg=0, augment=True)
    dataset = EpochPatchDataset([_volume()], transform, seed=3)
    patches = dataset[0]
    assert len(patches) == 3
    for p in patches:
        assert tuple(p["image"].shape) == (1, 16, 8, 8) and tuple(p["label"].shape) == (2, 16, 8, 8)
        assert p["label"].sum() > 0  # pos only: every patch holds the structure
        assert torch.equal(p["annotated"], torch.tensor([True, False]))
    again = dataset[0]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(patches, again))
    dataset.set_epoch(1)
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(patches, dataset[0]))


def test_dataset_balanced_sampling_equalises_groups():
    volumes = list(range(10))
    dataset = EpochPatchDataset(volumes, lambda v: v, groups=[0] * 9 + [1], length=2000)
    dataset.transform = type("T", (), {"set_random_state": lambda self, seed: None, "__call__": lambda self, v: v})()
    drawn = np.array([volumes[i] for i in dataset.order])
    assert 0.45 < (drawn == 9).mean() < 0.55  # the one-volume dataset gets half the draws
    plain = EpochPatchDataset(volumes, dataset.transform, length=20)
    assert list(plain.order) == list(range(10)) * 2


def test_class_sampling_centres_patches_on_small_structures_as_often_as_large():
    label = torch.zeros(3, 40, 40, 40, dtype=torch.uint8)
    label[0, 2:30, 2:30, 2:30] = 1  # large
    label[1, 35:37, 35:37, 35:37] = 1  # 8 voxels
    volume = {"image": torch.rand(1, 40, 40, 40), "label": label}  # channel 2: absent
    hits = {}
    for mode in ("foreground", "classes"):
        dataset = EpochPatchDataset([volume], patch_transforms((8, 8, 8), 4, pos=1, neg=0, augment=False,
                                                                sampling=mode), length=40)
        counts = np.zeros(3)
        for i in range(len(dataset)):
            for p in dataset[i]:
                assert set(p) == {"image", "label"} and tuple(p["label"].shape) == (3, 8, 8, 8)
                counts += (p["label"].reshape(3, -1).amax(1) > 0).numpy()
        hits[mode] = counts
    assert hits["foreground"][1] < 10  # 8 of 21,960 foreground voxels: almost never
    assert hits["classes"][1] > 50 and hits["classes"][0] > 50 and hits["classes"][2] == 0


def test_sampling_and_augmentation_options_are_checked(tmp_path):
    data = tiny_assembly(tmp_path)
    with pytest.raises(ConfigError, match="sampling must be one of foreground, classes"):
        assembly_from_dict(data, base_dir=tmp_path, overrides={"sampling": "organs"})
    with pytest.raises(ConfigError, match="flip_axes"):
        assembly_from_dict(data, base_dir=tmp_path, overrides={"flip_axes": [0, 3]})
    with pytest.raises(ConfigError, match="head_prior must be in"):
        assembly_from_dict(data, base_dir=tmp_path, overrides={"head_prior": 1.5})
    train = assembly_from_dict(data, base_dir=tmp_path, overrides={"flip_axes": [2, 1], "rotate90": False}).train
    assert train.flip_axes == (2, 1) and train.rotate90 is False
    # without flips along axis 0 a left-right asymmetric patch never comes out mirrored
    image = torch.zeros(1, 16, 8, 8)
    image[:, :4] = 1.0
    transform = patch_transforms((16, 8, 8), 1, augment=True, flip_axes=(1, 2), rotate90=False)
    dataset = EpochPatchDataset([{"image": image, "label": torch.ones(1, 16, 8, 8, dtype=torch.uint8)}], transform,
                                length=60)
    assert all(float(dataset[i][0]["image"][0, :4].mean()) > float(dataset[i][0]["image"][0, 12:].mean())
               for i in range(60))


def test_class_balanced_dataset_weights_raise_the_least_annotated_class():
    # the phantom assembly: A liver spleen kidneys stomach; B pancreas aorta IVC liver vertebrae;
    # C kidneys spleen aorta vertebrae stomach
    annotates = np.array([[1, 1, 1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0, 1, 0, 1]], bool)
    p = class_balanced_group_weights(annotates)
    assert p.sum() == pytest.approx(1) and (p >= 0).all()
    share = annotates.T.astype(float) @ p
    assert share.min() == pytest.approx(0.5, abs=1e-6)  # uniform datasets: pancreas and IVC get 1/3
    assert (annotates.T.astype(float) @ np.full(3, 1 / 3)).min() == pytest.approx(1 / 3)
    # two datasets per annotation set (an assembly grown with more cases): each pair splits its
    # share evenly, or by size, instead of the programme handing all of it to one dataset
    doubled = class_balanced_group_weights(np.vstack([annotates, annotates]))
    assert doubled[:3] == pytest.approx(doubled[3:]) and (doubled > 0).all()
    assert (np.vstack([annotates, annotates]).T.astype(float) @ doubled).min() == pytest.approx(0.5, abs=1e-6)
    sized = class_balanced_group_weights(np.vstack([annotates, annotates]), sizes=[24, 24, 24, 72, 72, 72])
    assert sized[3:] == pytest.approx(3 * sized[:3]) and sized[:3] + sized[3:] == pytest.approx(doubled[:3] + doubled[3:])
    with pytest.raises(ConfigError, match="positive volume counts"):
        class_balanced_group_weights(annotates, sizes=[24, 0, 24])
    # symmetric assemblies stay uniform
    assert class_balanced_group_weights(np.eye(3, dtype=bool)) == pytest.approx(np.full(3, 1 / 3))
    with pytest.raises(ConfigError, match="at least one dataset"):
        class_balanced_group_weights(np.array([[1, 0], [1, 0]], bool))
    # the weights drive the draws: group 1 (one volume of ten) gets 80 % of them
    identity = type("T", (), {"set_random_state": lambda self, seed: None, "__call__": lambda self, v: v})()
    dataset = EpochPatchDataset(list(range(10)), identity, groups=[0] * 9 + [1], length=4000,
                                group_weights=[0.2, 0.8])
    assert 0.77 < (dataset.order == 9).mean() < 0.83


# ---------------------------------------------------------------------------- training


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    data = tiny_assembly(tmp_path)
    straight = pretrain(assembly_from_dict(data, base_dir=tmp_path), tmp_path / "straight")
    assert straight.epochs_done == 2 and straight.model_path == tmp_path / "straight" / "model.safetensors"

    cut = tmp_path / "cut"
    first = pretrain(assembly_from_dict(data, base_dir=tmp_path), cut, until_epoch=1)
    assert first.model_path is None and first.epochs_done == 1
    assert not (cut / "model.safetensors").exists() and (cut / "checkpoint.pt").exists()
    with pytest.raises(ConfigError, match="--resume"):
        pretrain(assembly_from_dict(data, base_dir=tmp_path), cut)
    resumed = pretrain(assembly_from_dict(data, base_dir=tmp_path), cut, resume=True)
    assert resumed.epochs_done == 2

    a, b = _weights(straight.model), _weights(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # training moved the weights (the comparison is not between two untouched models)
    assert any(not torch.allclose(a[k], _weights(first.model)[k]) for k in a if a[k].is_floating_point())

    log = [json.loads(line) for line in (cut / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in straight.history], rel=1e-5)
    assert set(log[0]["loss_per_class"]) == {"liver", "spleen", "kidney_left"}


def test_validation_dice_is_logged_and_head_prior_sets_the_biases(tmp_path):
    data = tiny_assembly(tmp_path, lr=0.0, head_prior=0.02, sampling="classes", balance_classes=True)
    data["validation"] = {"path": "A", "every": 1, "max_cases": 1}
    result = pretrain(assembly_from_dict(data, base_dir=tmp_path), tmp_path / "run")
    bias = result.model.head.bias.detach()
    assert torch.allclose(bias, torch.full_like(bias, float(np.log(0.02 / 0.98))))  # lr 0: untouched
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # A annotates liver and spleen only: those are scored, each a Dice in [0, 1]
    assert [sorted(r["val_dice"]) for r in log] == [["liver", "spleen"]] * 2
    assert all(0.0 <= v <= 1.0 for r in log for v in r["val_dice"].values())
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:4] == ["epoch", "loss", "lr", "seconds"] and "val_dice_liver" in header
    assert "val_dice_mean" in header and len(rows) == 3
    # the model file records, per class the validation set annotates, whether to keep only the
    # largest component: kept unless it lowered the validation Dice
    from fseft.models.checkpoint import read_model_file_config

    post = read_model_file_config(result.model_path)["extra"]["postprocess"]
    assert set(post["largest_component"]) == set(post["validation_dice"]) == {"liver", "spleen"}
    for c, (with_step, without) in post["validation_dice"].items():
        assert post["largest_component"][c] is (with_step >= without)
    missing = tiny_assembly(tmp_path)
    missing["validation"] = {"path": "nowhere"}
    with pytest.raises(ConfigError, match="validation: dataset folder .*nowhere does not exist"):
        assembly_from_dict(missing, base_dir=tmp_path)
    missing["validation"] = {"path": "A", "evry": 2}
    with pytest.raises(ConfigError, match="did you mean 'every'"):
        assembly_from_dict(missing, base_dir=tmp_path)


def test_soft_labels_train_on_mask_fractions_cached_apart_from_binary_masks(tmp_path):
    from fseft.pretraining import prepare_cache, resolve_sources
    from fseft.training.distributed import DistributedContext

    data = tiny_assembly(tmp_path, epochs=1, soft_labels=True)
    data["preprocess"] = {"spacing": [6, 6, 6]}  # 4 mm -> 6 mm: boundaries fall inside model voxels
    data["validation"] = {"path": "A", "every": 1}
    assembly = assembly_from_dict(data, base_dir=tmp_path)
    pretrain(assembly, tmp_path / "run")
    log = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert all(0.0 <= v <= 1.0 for v in log["val_dice"].values())  # fractions thresholded at 0.5

    catalogue, sources = resolve_sources(assembly)
    ctx = DistributedContext()
    cache = tmp_path / "run" / "cache"
    soft = prepare_cache(sources, catalogue, assembly.preprocess, cache, ctx, progress=False, soft_labels=True)
    hard = prepare_cache(sources, catalogue, assembly.preprocess, cache, ctx, progress=False)
    assert {v.path for v in soft.volumes}.isdisjoint(v.path for v in hard.volumes)
    item_soft, item_hard = soft[0], hard[0]
    assert item_soft["label"].dtype == torch.float32 and item_hard["label"].dtype == torch.uint8
    fractions = item_soft["label"][item_soft["annotated"]]
    assert float(fractions.min()) >= 0.0 and float(fractions.max()) <= 1.0
    assert bool(((fractions > 0.05) & (fractions < 0.95)).any())  # partial-volume voxels
    # the same structures, in the same places, whichever way they were resampled
    for c in item_soft["annotated"].nonzero().flatten().tolist():
        volume_soft, volume_hard = float(item_soft["label"][c].sum()), float(item_hard["label"][c].sum())
        assert volume_soft == pytest.approx(volume_hard, rel=0.35)


def test_init_starts_from_a_model_file_and_maps_the_head_by_class_name(tmp_path):
    first = pretrain(assembly_from_dict(tiny_assembly(tmp_path), base_dir=tmp_path), tmp_path / "first")
    donor = _weights(first.model)
    # continued pre-training with another catalogue: gallbladder new, kidney_left dropped
    data = tiny_assembly(tmp_path, lr=0.0, head_prior=0.02)
    data["model"]["classes"] = ["spleen", "gallbladder", "liver"]
    data["model"]["init"] = "first/model.safetensors"  # relative to the assembly, like datasets
    data["datasets"] = [{"path": "A", "structures": ["liver", "spleen"]}]
    assembly = assembly_from_dict(data, base_dir=tmp_path)
    assert assembly.init == str(tmp_path / "first" / "model.safetensors")
    second = pretrain(assembly, tmp_path / "second")  # lr 0: the weights stay what init gave
    ours = _weights(second.model)
    body = [k for k in donor if not k.startswith("head.") and donor[k].is_floating_point()]
    # the donor file is float32 here; BatchNorm statistics move in training mode, weights do not
    assert all(torch.allclose(ours[k], donor[k]) for k in body if "running" not in k)
    order = first.model.class_names  # (liver, spleen, kidney_left)
    for i, name in enumerate(("spleen", "gallbladder", "liver")):
        if name == "gallbladder":  # a new class keeps the head prior
            assert ours["head.bias"][i].item() == pytest.approx(float(np.log(0.02 / 0.98)))
        else:
            j = order.index(name)
            assert torch.allclose(ours["head.weight"][i], donor["head.weight"][j])
            assert ours["head.bias"][i].item() == pytest.approx(donor["head.bias"][j].item())
    assert json.loads((tmp_path / "second" / "assembly.json").read_text())["model"]["init"] == assembly.init
    from fseft.models.checkpoint import read_model_file_config

    config = read_model_file_config(second.model_path)
    assert config["extra"]["pretrain"]["init"] == "model.safetensors"

    data["model"]["init"] = "nowhere.safetensors"
    with pytest.raises(ConfigError, match="model.init: 'nowhere.safetensors' is neither a zoo id"):
        assembly_from_dict(data, base_dir=tmp_path)
    data["model"]["init"] = "first/model.safetensors"
    data["model"]["arch_kwargs"] = {"base_channels": 4}
    with pytest.raises(ConfigError, match="model.init: .*same architecture and size"):
        pretrain(assembly_from_dict(data, base_dir=tmp_path), tmp_path / "third")
    assert not (tmp_path / "third").exists()  # checked before anything is written
    # same tensors, but another function: batch statistics at inference instead of running ones
    data["model"]["arch_kwargs"] = {**first.model.arch_kwargs, "inference_norm": "batch"}
    with pytest.raises(ConfigError, match=r"model.init: .*trained with \{'inference_norm': 'running'\}, the assembly "
                                          r"builds \{'inference_norm': 'batch'\}"):
        pretrain(assembly_from_dict(data, base_dir=tmp_path), tmp_path / "third")
    assert not (tmp_path / "third").exists()


def test_diverged_pretraining_stops_before_writing_a_checkpoint(tmp_path, capsys):
    data = tiny_assembly(tmp_path, lr=1e25, epochs=3)
    path = write_yaml(tmp_path / "a.yaml", data)
    assert main(["pretrain", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "pre-training diverged" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "run" / "model.safetensors").exists()


def test_resume_without_checkpoint_is_an_error(tmp_path):
    data = tiny_assembly(tmp_path)
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        pretrain(assembly_from_dict(data, base_dir=tmp_path), tmp_path / "empty", resume=True)


@pytest.mark.slow
def test_phantom_pretrain_cli_end_to_end(tmp_path):
    from fseft.data.datasets import open_dataset
    from fseft.data.phantom import write_partial_label_sources
    from fseft.data.preprocessing import PreprocessConfig, preprocess
    from fseft.models.checkpoint import read_model_file_config
    from fseft.models.zoo import load_model

    write_partial_label_sources(tmp_path / "sources", n_sources=3, cases_per_source=1, progress=False)
    example = yaml.safe_load((Path(__file__).parents[2] / "examples" / "pretrain_phantom.yaml").read_text())
    # the example's datasets, validation and catalogue, with a tiny model and coarse voxels
    example["datasets"] = [{**d, "path": str(tmp_path / "sources" / Path(d["path"]).name)} for d in example["datasets"]]
    example["validation"] = {**example["validation"], "path": str(tmp_path / "sources" / "partial_B"), "every": 1}
    example["model"] = {"arch": "unet3d", "arch_kwargs": {"base_channels": 2}, "classes": example["model"].get("classes")}
    example["preprocess"] = {**example.get("preprocess", {}), "spacing": [6, 6, 6]}
    config = write_yaml(tmp_path / "assembly.yaml", example)
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--out", str(out), "--epochs", "1",
                 "--patch-size", "16", "16", "16", "--batch-size", "1", "--no-progress"]) == 0

    model = load_model(str(out / "model.safetensors"))
    assert "gallbladder" not in model.class_names and {"liver", "pancreas", "aorta"} <= set(model.class_names)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and np.isfinite(log[0]["loss"])
    assert all(v is not None for v in log[0]["loss_per_class"].values())  # every class seen in one epoch
    assert set(log[0]["val_dice"]) == {"pancreas", "aorta", "inferior_vena_cava", "liver", "vertebrae"}

    # the model file carries the preprocessing it was trained with
    cfg = PreprocessConfig.from_dict(read_model_file_config(out / "model.safetensors")["preprocess"])
    assert cfg.spacing == (6.0, 6.0, 6.0)
    image, _ = open_dataset(tmp_path / "sources" / "partial_A").cases[0].load()
    x = preprocess(image, None, cfg).image.as_tensor()[None, :, :16, :16, :16]
    with torch.no_grad():
        assert model(x).shape == (1, len(model.class_names), 16, 16, 16)
