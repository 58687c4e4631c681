"""params.yaml is validated on load: a wrong key fails early, by name."""

import pytest
import yaml

from conftest import REPO
from imgcls.errors import UserError
from imgcls.params import load_params


def write_params(tmp_path, **changes):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in changes.items():
        section, _, key = dotted.rpartition(".")
        target = data[section] if section else data
        if value is None:
            del target[key]
        else:
            target[key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "gear"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"resize.image_sise": 64}, "resize.image_sise: unknown key"),
        ({"resize.image_size": None}, "resize.image_size: missing"),
        ({"resize.image_size": "big"}, "resize.image_size = 'big': must be a side in pixels from 8 to 1024, or a list"),
        ({"resize.image_size": 4}, "resize.image_size = 4: must be a side in pixels from 8 to 1024"),
        ({"resize.image_size": [160, 4]}, "resize.image_size = [160, 4]: must be a side in pixels from 8 to 1024"),
        ({"resize.image_size": []}, "resize.image_size = []: must be a side in pixels"),
        ({"resize.aspect": "squash"}, "resize.aspect = 'squash': Input should be 'pad', 'center_crop' or 'stretch'"),
        ({"resize.max_stretch": 0.5}, "resize.max_stretch = 0.5: must be a number from 1 to 10, or auto"),
        ({"resize.background": [300, 0, 0]}, "background must be three integers in 0..255"),
        ({"split.test": 0}, "split.test = 0: Input should be greater than 0"),
        ({"resize.conflicting_labels": "merge"},
         "resize.conflicting_labels = 'merge': Input should be 'fail', 'drop' or 'keep'"),
        ({"resize.near_duplicate_distance": 40}, "resize.near_duplicate_distance = 40: Input should be less than or equal to 32"),
        ({"resize.near_duplicate_distance": -1}, "resize.near_duplicate_distance = -1: Input should be greater than or equal to 0"),
        ({"predict_new.min_confidence": "sometimes"},
         "predict_new.min_confidence = 'sometimes': must be a number from 0 to 1, or auto"),
        ({"predict_new.min_confidence": 1.5}, "predict_new.min_confidence = 1.5: must be a number from 0 to 1, or auto"),
        ({"predict_new.target_coverage": 0}, "predict_new.target_coverage = 0: Input should be greater than 0"),
        ({"predict_new.target_coverage": 1.2}, "predict_new.target_coverage = 1.2: Input should be less than or equal to 1"),
        ({"evaluate.ood_dir": None}, "evaluate.ood_dir: missing"),
        ({"export.min_agreement": 0}, "export.min_agreement = 0: Input should be greater than 0"),
        ({"export.min_agreement": 1.5}, "export.min_agreement = 1.5: Input should be less than or equal to 1"),
        ({"export.min_agreement": "high"}, "export.min_agreement = 'high': Input should be a valid number"),
        ({"evaluate.ood_dir": 3}, "evaluate.ood_dir = 3: Input should be a valid string"),
    ],
)
def test_a_bad_value_is_named_with_what_is_allowed(tmp_path, changes, message):
    with pytest.raises(UserError) as error:
        load_params(write_params(tmp_path, **changes))
    assert message in str(error.value)


def test_every_problem_is_listed_at_once(tmp_path):
    with pytest.raises(UserError, match="has 2 invalid value"):
        load_params(write_params(tmp_path, **{"resize.workers": -1, "split.seed": "x"}))


def test_a_missing_or_broken_file_says_so(tmp_path):
    with pytest.raises(UserError, match="not found: run the stages from the repository root"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("data: [unclosed")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_params(tmp_path / "broken.yaml")


def test_a_stage_prints_the_problem_without_a_traceback(prepared):
    prepared.set_params(**{"split.trian": 0.7})
    result = prepared.stage("split", check=False)
    assert result.returncode == 2
    assert "split.trian: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_key_of_the_old_flat_cnn_layout_names_its_new_place(tmp_path):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["train_cnn"].update(filters=[8], ema_momentum=0.9, batch_norm_epsilon=1e-12)
    data["train_cnn"]["optimizer"] = "sgd"  # what `dvc exp run -S train_cnn.optimizer=sgd` leaves
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as error:
        load_params(tmp_path / "params.yaml")
    message = str(error.value)
    assert "has 4 train_cnn key(s) of the old flat layout" in message
    assert "train_cnn.filters moved to train_cnn.net.filters" in message
    assert "train_cnn.ema_momentum moved to train_cnn.ema.momentum" in message
    assert "train_cnn.optimizer moved to train_cnn.optimizer.name" in message
    assert "train_cnn.batch_norm_epsilon was dropped: batch norm always adds Keras' 0.001" in message


def test_every_old_cnn_key_has_a_new_place_that_exists():
    from imgcls.cnn_params import CNN_KEYS_DROPPED, CNN_KEYS_MOVED, TrainCnnParams

    section = load_params(REPO / "params.yaml").train_cnn
    for old, new in CNN_KEYS_MOVED.items():
        part, name = new.split(".")
        assert name in type(getattr(section, part)).model_fields, new
    assert not set(CNN_KEYS_MOVED) & set(CNN_KEYS_DROPPED)
    # No key of the old layout is a setting of the new one, except `optimizer`, whose value was a name.
    assert set(CNN_KEYS_MOVED) & set(TrainCnnParams.model_fields) == {"optimizer"}


def test_a_stage_stops_on_an_old_cnn_key_without_a_traceback(project):
    project.set_params(**{"train_cnn.test_time_flip": True})
    result = project.stage("train_cnn", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train_cnn.test_time_flip moved to train_cnn.test_time.flip" in result.stderr


def _leaves(section: dict, prefix: str = "") -> list[str]:
    return [key for name, value in section.items()
            for key in (_leaves(value, f"{prefix}{name}.") if isinstance(value, dict) else [f"{prefix}{name}"])]


@pytest.mark.parametrize("preset", sorted(path.stem for path in (REPO / "presets").glob("*.yaml")))
def test_every_preset_sets_existing_keys_and_validates(tmp_path, preset):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    changes = yaml.safe_load((REPO / "presets" / f"{preset}.yaml").read_text())
    for key in _leaves(changes):
        *parents, name = key.split(".")
        target = data
        for parent in parents:
            target = target[parent]
        assert name in target, f"presets/{preset}.yaml sets {key}, which params.yaml does not have"
        value = changes
        for part in key.split("."):
            value = value[part]
        target[name] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    load_params(tmp_path / "params.yaml")


def test_dvc_yaml_declares_each_train_cnn_param():
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train_cnn"]["params"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())["train_cnn"]
    assert sorted(key for key in declared if key.startswith("train_cnn.")) == sorted(_leaves(params, "train_cnn."))
