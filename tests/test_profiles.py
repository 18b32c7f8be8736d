"""Profiles: one source of truth, overridable by name, checked before anything runs."""

import json
import re

import pytest

from drnb.profiles import PROFILES, Profile, load_profile, parse_assignments, resolve_profile
from drnb.runs import open_run


def test_paper_profile_is_the_study_configuration():
    paper = PROFILES["paper"]
    assert (paper.encoder, paper.image_size) == ("densenet121", 224)
    assert (paper.pretext_learning_rate, paper.pretext_batch_size, paper.pretext_epochs) == (1e-5, 32, 200)
    assert paper.pretext_hidden == (2048, 1024)
    assert (paper.finetune_learning_rate, paper.finetune_batch_size) == (5e-5, 32)
    assert (paper.warmup_epochs, paper.finetune_epochs, paper.repetitions) == (3, 17, 5)
    assert paper.fractions == (0.05, 0.1, 0.25, 0.5, 1.0)
    assert (paper.target, paper.finetune_hidden) == ("ordinal", (1024,))
    assert paper.validation_fraction == 0.05  # configs/finetune/rotation_2d.json: "val_split": 0.05
    assert paper.feature_stages == "last"  # the study's head reads DenseNet121's pooled output


def test_overrides_are_parsed_to_the_field_types():
    profile = resolve_profile("smoke", {"pretext_epochs": "7", "fractions": "0.1,1.0", "ben_graham": "true", "pretext_learning_rate": "1e-4"})
    assert profile.pretext_epochs == 7
    assert profile.fractions == (0.1, 1.0)
    assert profile.ben_graham is True
    assert profile.pretext_learning_rate == 1e-4
    assert PROFILES["smoke"].pretext_epochs != 7  # the registry itself is untouched


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"no_such_setting": "1"}, "no such setting"),
        ({"fractions": "0"}, "fractions"),
        ({"fractions": "1.5"}, "fractions"),
        ({"pretext_epochs": "many"}, "pretext_epochs"),
        ({"dataset": "kaggle"}, "dataset"),
        ({"encoder": "resnet50"}, "encoder"),
        ({"repetitions": "6"}, "repetitions"),
        ({"ben_graham": "perhaps"}, "ben_graham"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"cut_points": "optimised"}, "cut_points"),
        ({"calibration_images": 0}, "calibration_images"),
        ({"finetune_min_steps": "-1"}, "finetune_min_steps"),
        ({"finetune_min_steps": "50", "finetune_max_steps": "40"}, "finetune_max_steps"),
        ({"finetune_epochs": "-1"}, "finetune_epochs=-1: expected an epoch count"),
        ({"warmup_epochs": "-1"}, "warmup_epochs=-1: expected an epoch count"),
        ({"finetune_epochs": "0"}, "finetune_epochs=0 never trains the encoder: expected finetune_epochs >= 1 with protocol 'finetune'"),
        ({"finetune_epochs": "0", "protocols": "linear"}, "validation_fraction=0.1 chooses among fine-tuning epochs"),
        ({"warmup_epochs": "0", "protocols": "linear"}, "warmup_epochs=0 trains nothing: expected head_init='ridge'"),
        ({"protocols": "finetune,finetune"}, "expected one or both of \\['finetune', 'linear'\\], each once"),
        ({"protocols": ""}, "protocols=\\(\\): expected one or both"),
        ({"protocols": "probe"}, "protocols='probe': expected one of"),
        ({"finetune_batchnorm": "off"}, "finetune_batchnorm='off': expected one of \\['batch', 'frozen'\\]"),
    ],
)
def test_bad_overrides_name_the_setting(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_profile("smoke", overrides)


def test_unknown_profile():
    with pytest.raises(ValueError, match="profile"):
        resolve_profile("fast")


def test_assignments():
    assert parse_assignments(["a=1", " b = x=y "]) == {"a": "1", "b": "x=y"}
    with pytest.raises(ValueError, match="key=value"):
        parse_assignments(["pretext_epochs"])


def test_profile_round_trips_through_json(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(PROFILES["quick"].to_json())
    assert load_profile(path) == PROFILES["quick"]
    path.write_text(json.dumps({**PROFILES["quick"].to_dict(), "colour": "red"}))
    with pytest.raises(ValueError, match="colour"):
        load_profile(path)


def test_a_run_folder_keeps_its_settings(tmp_path):
    paths, profile = open_run(tmp_path / "run", "smoke", {"pretext_epochs": "2", "data_dir": ""})
    assert profile.pretext_epochs == 2 and paths.profile.exists()
    # Reopening with no or the same overrides gives the stored settings...
    assert open_run(tmp_path / "run", "quick")[1] == profile
    assert open_run(tmp_path / "run", "smoke", {"pretext_epochs": 2})[1] == profile
    # ...but changing them is refused, so results made with different settings never mix.
    with pytest.raises(ValueError, match="pretext_epochs"):
        open_run(tmp_path / "run", "smoke", {"pretext_epochs": "3"})


def test_opening_a_missing_run_without_create_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run"):
        open_run(tmp_path / "absent", create=False)
    assert not (tmp_path / "absent").exists()


def test_profiles_validate_directly():
    with pytest.raises(ValueError, match="rotation_mode"):
        Profile(rotation_mode="random4")
    with pytest.raises(ValueError, match="pretext_batch_size"):
        Profile(rotation_mode="all4", pretext_batch_size=30)


def test_a_run_folder_written_before_a_setting_existed_keeps_its_old_behaviour(tmp_path):
    # A profile.json from before near duplicates were grouped resumes without grouping them,
    # so its remaining runs use the same folds as its finished ones.
    values = json.loads(PROFILES["quick"].to_json())
    # Likewise one from before prior-matched cut points keeps decoding with the fixed rule.
    del values["duplicate_threshold"], values["cut_points"]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(values))
    assert load_profile(path).duplicate_threshold == 0
    assert load_profile(path).cut_points == "fixed"
    assert PROFILES["quick"].duplicate_threshold == 0.97
    assert PROFILES["quick"].cut_points == "prior"


def test_quick_normalises_local_colour_and_paper_keeps_the_studys_images():
    # Measured on IDRiD's raw photographs (docs/decisions.md): Ben Graham's normalisation is worth about
    # .2 QWK to quick; the study's code fed the photographs as they were.
    assert PROFILES["quick"].ben_graham and not PROFILES["paper"].ben_graham
    assert resolve_profile("quick", {"ben_graham": "false"}).ben_graham is False


def test_quick_pools_every_stage_and_a_run_folder_from_before_keeps_the_last(tmp_path):
    # Measured on EyePACS and IDRiD (docs/decisions.md): the middle stages carry more of the grade.
    assert PROFILES["quick"].feature_stages == "all"
    assert resolve_profile("quick", {"feature_stages": "last"}).feature_stages == "last"
    values = json.loads(PROFILES["quick"].to_json())
    del values["feature_stages"]
    (tmp_path / "profile.json").write_text(json.dumps(values))
    assert load_profile(tmp_path / "profile.json").feature_stages == "last"  # its saved encoder pools the last stage


def test_quick_starts_a_regression_head_from_a_ridge_fit_and_old_run_folders_do_not(tmp_path):
    quick = PROFILES["quick"]
    assert (quick.target, quick.head_init, quick.finetune_hidden, quick.recalibrate_batchnorm) == ("regression", "ridge", (), True)
    assert quick.test_time_turns == 8  # fitted and predicted on every symmetry of the square
    assert (PROFILES["paper"].head_init, PROFILES["paper"].recalibrate_batchnorm) == ("random", False)  # as the study
    assert PROFILES["paper"].test_time_turns == 1
    assert (quick.scratch_encoder, PROFILES["paper"].scratch_encoder) == ("shared", "per_repetition")
    values = json.loads(quick.to_json())
    for name in ("head_init", "recalibrate_batchnorm", "test_time_turns", "scratch_encoder", "protocols", "finetune_batchnorm"):
        del values[name]
    values.update(target="ordinal", finetune_hidden=[256], finetune_epochs=8)  # what a quick run folder from before holds
    (tmp_path / "profile.json").write_text(json.dumps(values))
    old = load_profile(tmp_path / "profile.json")
    assert (old.head_init, old.recalibrate_batchnorm, old.test_time_turns) == ("random", False, 1)
    assert old.scratch_encoder == "per_repetition"  # a resumed sweep keeps its scratch runs' encoders
    assert (old.protocols, old.finetune_batchnorm) == (("finetune",), "batch")
    # A folder from when quick evaluated linearly alone (no epoch) resumes as linear evaluation.
    values = json.loads(quick.to_json())
    del values["protocols"]
    values.update(finetune_epochs=0)
    (tmp_path / "profile.json").write_text(json.dumps(values))
    assert load_profile(tmp_path / "profile.json").protocols == ("linear",)


@pytest.mark.parametrize("overrides", [{"target": "ordinal"}, {"finetune_hidden": "64"}])
def test_a_ridge_fitted_head_must_be_a_linear_regression_head(overrides):
    with pytest.raises(ValueError, match="head_init='ridge' fits a linear regression head"):
        resolve_profile("quick", overrides)
    with pytest.raises(ValueError, match="head_init"):
        Profile(head_init="lstsq")


def test_quick_fine_tunes_and_reads_out_linearly_with_bounded_steps():
    quick = PROFILES["quick"]
    assert quick.protocols == ("finetune", "linear") and PROFILES["paper"].protocols == ("finetune",)
    assert (quick.warmup_epochs, quick.head_init, quick.finetune_batchnorm) == (0, "ridge", "frozen")
    assert PROFILES["paper"].finetune_batchnorm == "batch"  # as Keras's fit in the study's code
    assert PROFILES["paper"].finetune_epochs == 17  # the study fine-tunes
    from drnb.finetune import plan_steps

    # A few labels get the floor of steps, many the cap: APTOS's 5 % and 100 % pools.
    steps_at = {n: plan_steps(n, 32, quick)[1] * quick.finetune_epochs for n in (146, 2_930)}
    assert steps_at[146] >= quick.finetune_min_steps and steps_at[2_930] <= quick.finetune_max_steps + quick.finetune_epochs
    assert steps_at[146] < steps_at[2_930]


def test_scratch_encoder_must_be_per_repetition_or_shared():
    with pytest.raises(ValueError, match="scratch_encoder='each'"):
        resolve_profile("smoke", {"scratch_encoder": "each"})


def test_rotated_copies_follow_the_rotation_mode():
    from drnb.pretexts.rotation import rotated_copies

    assert PROFILES["quick"].rotation_mode == "all4" and rotated_copies(PROFILES["quick"]) == 4
    assert PROFILES["paper"].rotation_mode == "random1" and rotated_copies(PROFILES["paper"]) == 1


def test_a_run_folder_with_a_removed_setting_loads_only_with_the_value_drnb_now_uses(tmp_path):
    values = json.loads(PROFILES["quick"].to_json())
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({**values, "pooling": "avg", "ridge_turns": 8, "ridge_criterion": "correlation", "min_steps": 0}))
    assert load_profile(path) == PROFILES["quick"]
    path.write_text(json.dumps({**values, "pooling": "max", "ridge_turns": 8, "ridge_criterion": "correlation"}))
    with pytest.raises(ValueError, match="pooling='max'; drnb no longer has this setting and always uses 'avg'"):
        load_profile(path)
    path.write_text(json.dumps({**values, "ridge_turns": 4}))
    with pytest.raises(ValueError, match="ridge_turns=4 differs from test_time_turns=8"):
        load_profile(path)
    path.write_text(json.dumps({**values, "pooling": "avg"}))  # an older drnb's, from before ridge_turns: one view
    with pytest.raises(ValueError, match="ridge_turns=1 differs from test_time_turns=8"):
        load_profile(path)
    paper = json.loads(PROFILES["paper"].to_json())
    path.write_text(json.dumps({**paper, "ridge_criterion": "error", "ridge_turns": 1}))  # no ridge head: irrelevant
    assert load_profile(path) == PROFILES["paper"]
    with pytest.raises(ValueError, match="--set pooling: no such setting"):
        resolve_profile("quick", {"pooling": "max"})


def test_demo_is_quicks_recipe_lightened_on_synthetic_photographs_at_48_px():
    demo, quick = PROFILES["demo"].to_dict(), PROFILES["quick"].to_dict()
    differing = {key for key in demo if demo[key] != quick[key]}
    # What it spends less on: pixels, repetitions, the step floor, views, the pretext's steps.
    assert differing == {"name", "image_size", "synthetic_images", "repetitions", "finetune_min_steps", "test_time_turns", "pretext_min_steps"}
    assert (demo["dataset"], demo["image_size"], demo["repetitions"]) == ("synthetic", 48, 3)


@pytest.mark.parametrize(
    "setting, value, expected",
    [("seed", "-1", "seed must be an integer in 0.."), ("seed", str(2**31), "seed must be an integer in 0.."),
     ("folds", "1", "folds must be an integer >= 2"), ("bootstrap_resamples", "0", "bootstrap_resamples must be"),
     ("pretext_hidden", "0", "pretext_hidden width must be"), ("finetune_learning_rate", "inf", "finite")],
)
def test_settings_out_of_range_are_refused_naming_the_setting(setting, value, expected):
    overrides = {setting: value, **({"repetitions": "1"} if setting == "folds" else {})}
    with pytest.raises(ValueError, match=re.escape(expected)):
        resolve_profile("smoke", overrides)


def test_a_damaged_profile_json_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text('{"name": "smoke", ')
    with pytest.raises(ValueError, match=re.escape(f"{path} is damaged: not valid JSON")):
        load_profile(path)
    path.write_text(PROFILES["smoke"].to_json().replace('"seed": 0', '"seed": -1'))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*seed must be an integer"):
        load_profile(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(f"{path} is damaged: expected a JSON object")):
        open_run(tmp_path, "smoke")


def test_a_fraction_the_run_folder_does_not_list_is_refused(tmp_path):
    from drnb.runs import listed_fraction

    paths, profile = open_run(tmp_path / "run", "smoke")
    assert listed_fraction(0.25, profile, paths) == 0.25
    with pytest.raises(ValueError, match=re.escape("fraction=0.5 is not one of this run folder's fractions [0.25, 1.0]")):
        listed_fraction(0.5, profile, paths)
