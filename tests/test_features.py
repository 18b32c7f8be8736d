"""Frozen features kept per encoder and view, in memory and between processes (drnb.features)."""


import keras
import numpy as np
import pytest

from drnb.features import FeatureStore, array_fingerprint, encoder_fingerprint

N_ROWS, WIDTH = 30, 5


class CountingEncoder:
    """Stands in for an encoder: row r's features are r + view/10 + the key's offset, and every call is kept."""

    def __init__(self, offset=0.0):
        self.calls, self.offset = [], offset

    def __call__(self, view):
        def encode(missing):
            self.calls.append(missing.tolist())
            return np.repeat(missing[:, None] + view / 10 + self.offset, WIDTH, axis=1).astype(np.float32)

        return encode


def expected(rows, view, offset=0.0):
    return np.repeat(np.asarray(rows)[:, None] + view / 10 + offset, WIDTH, axis=1).astype(np.float32)


def test_only_rows_not_kept_yet_are_encoded_in_any_order_and_with_repeats():
    store, encoder = FeatureStore(N_ROWS), CountingEncoder()
    np.testing.assert_array_equal(store.features("a", 0, [5, 3, 5], encoder(0)), expected([5, 3, 5], 0))
    np.testing.assert_array_equal(store.features("a", 0, [7, 3, 1], encoder(0)), expected([7, 3, 1], 0))
    assert encoder.calls == [[3, 5], [1, 7]]  # sorted and unique, each row once
    np.testing.assert_array_equal(store.features("a", 1, [3], encoder(1)), expected([3], 1))  # another view
    np.testing.assert_array_equal(store.features("b", 0, [3], encoder(0)), expected([3], 0))  # another encoder
    assert encoder.calls[2:] == [[3], [3]]
    np.testing.assert_array_equal(store.features("a", 0, [], encoder(0)), np.zeros((0, WIDTH), np.float32))
    assert (store.rows_encoded, store.rows_reused) == (6, 1)  # row 3 of encoder a, view 0, the second time


def test_a_save_frees_the_memory_of_what_is_on_disk_and_keeps_what_could_not_be_written(tmp_path):
    saved, encoder = FeatureStore(N_ROWS, tmp_path / "features"), CountingEncoder()
    saved.features("key", 0, [1, 2], encoder(0))
    (path,) = saved.save()
    np.testing.assert_array_equal(saved.features("key", 0, [2, 1], encoder(0)), expected([2, 1], 0))  # read back
    assert encoder.calls == [[1, 2]]
    assert saved.save() == []  # nothing new to write, and what was read back leaves memory again
    path.unlink()  # neither in memory nor on disk any more: encoded again
    saved.features("key", 0, [1], encoder(0))
    assert encoder.calls == [[1, 2], [1]]

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the features folder should be")
    unwritable, encoder = FeatureStore(N_ROWS, blocked, log=lambda line: None), CountingEncoder()
    unwritable.features("key", 0, [1, 2], encoder(0))
    assert unwritable.save() == []
    np.testing.assert_array_equal(unwritable.features("key", 0, [1, 2], encoder(0)), expected([1, 2], 0))
    assert encoder.calls == [[1, 2]]  # still in memory


def test_saved_features_are_read_by_another_store_without_encoding(tmp_path):
    first, encoder = FeatureStore(N_ROWS, tmp_path), CountingEncoder()
    first.features("key", 2, np.arange(10), encoder(2))
    assert first.save() == [tmp_path / "features_key_view2.npz"]
    assert first.save() == []  # nothing new since
    assert sorted(path.name for path in tmp_path.iterdir()) == ["features_key_view2.npz"]  # no temporary file left

    second, later = FeatureStore(N_ROWS, tmp_path), CountingEncoder()
    np.testing.assert_array_equal(second.features("key", 2, [9, 0, 12], later(2)), expected([9, 0, 12], 2))
    assert later.calls == [[12]]  # only the row the first store never encoded


def test_a_save_keeps_what_another_process_wrote_meanwhile(tmp_path):
    one, two = FeatureStore(N_ROWS, tmp_path), FeatureStore(N_ROWS, tmp_path)
    one.features("key", 0, [0, 1], CountingEncoder()(0))
    two.features("key", 0, [2, 3], CountingEncoder()(0))
    one.save()
    two.save()  # written last, with one's rows merged in
    third, encoder = FeatureStore(N_ROWS, tmp_path), CountingEncoder()
    np.testing.assert_array_equal(third.features("key", 0, [0, 1, 2, 3], encoder(0)), expected([0, 1, 2, 3], 0))
    assert encoder.calls == []


def test_an_unreadable_or_mismatched_file_is_reported_and_encoded_again(tmp_path):
    (tmp_path / "features_broken_view0.npz").write_bytes(b"not a zip file")
    np.savez(tmp_path / "features_other_view0.npz", features=np.zeros((N_ROWS + 1, WIDTH), np.float32), encoded=np.ones(N_ROWS + 1, bool))
    messages = []
    store, encoder = FeatureStore(N_ROWS, tmp_path, log=messages.append), CountingEncoder()
    np.testing.assert_array_equal(store.features("broken", 0, [4], encoder(0)), expected([4], 0))
    np.testing.assert_array_equal(store.features("other", 0, [4], encoder(0)), expected([4], 0))
    assert encoder.calls == [[4], [4]]
    assert "features_broken_view0.npz" in messages[0] and "encoded again" in messages[0]
    assert "features_other_view0.npz" in messages[1] and f"expected float32 ({N_ROWS}, F)" in messages[1]
    store.save()  # replaced by readable files
    assert FeatureStore(N_ROWS, tmp_path).features("broken", 0, [4], CountingEncoder()(0))[0, 0] == pytest.approx(4)


def test_a_file_that_cannot_be_written_is_reported_and_the_run_goes_on(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the features folder should be")
    messages = []
    store = FeatureStore(N_ROWS, blocked, log=messages.append)
    np.testing.assert_array_equal(store.features("key", 0, [1], CountingEncoder()(0)), expected([1], 0))
    assert store.save() == []
    assert "cannot write" in messages[0] and "features_key_view0.npz" in messages[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["not-a-folder"]  # nothing half-written left


def test_no_rows_asked_no_encoding():
    store, encoder = FeatureStore(N_ROWS), CountingEncoder()
    assert store.features("new", 0, [], encoder(0)).shape == (0, 0)  # nothing encoded yet: no width known
    store.features("new", 0, [2], encoder(0))
    assert store.features("new", 0, [], encoder(0)).shape == (0, WIDTH)
    assert encoder.calls == [[2]]


def test_bad_rows_and_bad_encodings_are_errors():
    store = FeatureStore(N_ROWS)
    with pytest.raises(ValueError, match=r"indices in \[0, 30\)"):
        store.features("a", 0, [N_ROWS], CountingEncoder()(0))
    with pytest.raises(ValueError, match=r"encode returned shape \(1, 5\); expected \(2, features\)"):
        store.features("a", 0, [1, 2], lambda missing: np.zeros((1, WIDTH)))
    with pytest.raises(ValueError, match="n_rows=0"):
        FeatureStore(0)


def test_the_fingerprint_follows_every_weight_and_the_context():
    def encoder(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])

    same_a, same_b, other = encoder(0), encoder(0), encoder(1)
    # The same weights in another architecture (an activation adds no weight) are another encoder.
    keras.utils.set_random_seed(0)
    activated = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu")])
    assert [w.tolist() for w in activated.get_weights()] == [w.tolist() for w in same_a.get_weights()]
    assert encoder_fingerprint(activated) != encoder_fingerprint(same_a)
    assert encoder_fingerprint(same_a) == encoder_fingerprint(same_b)
    assert encoder_fingerprint(same_a) != encoder_fingerprint(other)
    assert encoder_fingerprint(same_a, context="images 1") != encoder_fingerprint(same_a, context="images 2")
    kernel, bias = same_b.get_weights()
    bias[0] += 1e-7  # one weight, one ulp or so
    same_b.set_weights([kernel, bias])
    assert encoder_fingerprint(same_a) != encoder_fingerprint(same_b)
    assert array_fingerprint([np.zeros(4, np.uint8)]) != array_fingerprint([np.zeros((2, 2), np.uint8)])


def test_a_later_notebooks_session_reads_the_features_an_earlier_one_kept(tmp_path, tiny_fundus_set, linear_settings):
    """Two sessions (two fraction notebooks) of a linear profile: the second encodes only rows
    the first did not, and scores exactly what a session without kept features scores."""
    from drnb.finetune import FinetuneSession
    from drnb.models import profile_encoder
    from drnb.pretext import save_atomically
    from drnb.profiles import resolve_profile

    images, _, table = tiny_fundus_set
    profile = resolve_profile("smoke", {**linear_settings, "test_time_turns": "2", "fractions": "0.25,1.0"})
    encoder_path = tmp_path / "encoder.keras"
    save_atomically(profile_encoder(profile), encoder_path)

    def session(feature_dir):
        made = FinetuneSession(images, table, profile, encoder_paths={"rotation": encoder_path}, feature_dir=feature_dir, log=lambda line: None)
        made.encoded, encode = [], made.trainer.encode
        made.trainer.encode = lambda dataset: made.encoded.append(len(out := encode(dataset))) or out
        return made

    features = tmp_path / "features"
    first = session(features)
    for method in ("rotation", "scratch"):
        first.run(method, 0.25, 0, tmp_path / "first" / method)
    assert len(list(features.glob("features_*_view*.npz"))) == 2 * 2  # two encoders, two turns each

    second, alone = session(features), session(None)
    for method in ("rotation", "scratch"):
        kept = second.run(method, 1.0, 0, tmp_path / "second" / method)
        fresh = alone.run(method, 1.0, 0, tmp_path / "alone" / method)
        # Features read back or computed again agree to float32 rounding, summed in another order.
        assert kept["qw_kappa"] == fresh["qw_kappa"] and kept["cut_points"] == pytest.approx(fresh["cut_points"], abs=1e-5)
    split = second.split(0, 1.0)
    # The first notebook encoded the 25 % subset, the test fold and the calibration rows in
    # turns 0 and 2; the second, per encoder and turn, only the rest of the 100 % subset.
    first_rows = np.union1d(np.union1d(split.train[0.25], split.test), first.calibration_rows(split, profile.seed))
    new_rows = len(np.setdiff1d(split.train[1.0], first_rows))
    assert new_rows > 0 and second.encoded == [new_rows] * 4
    assert sum(alone.encoded) == 2 * 2 * (len(split.train[1.0]) + len(split.test))
    # Each run reports what it encoded and what it read (its calibration rows and the rows that
    # set its referable-DR threshold come from the 100 % subset, which the fit encoded just
    # before), per turn.
    calibration = len(second.calibration_rows(split, profile.seed))
    threshold_rows = len(second.operating_point_rows(split.train[1.0], profile.seed))
    assert kept["features_encoded"] == 2 * new_rows
    assert kept["features_reused"] == 2 * (len(split.train[1.0]) - new_rows + len(split.test) + calibration + threshold_rows)
    assert fresh["features_encoded"] == 2 * (len(split.train[1.0]) + len(split.test))
    assert fresh["features_reused"] == 2 * (calibration + threshold_rows)


FINGERPRINT_SCRIPT = """
import sys
from drnb.distribute import seed_weights
from drnb.features import encoder_fingerprint
from drnb.models import profile_encoder, rotation_head
from drnb.profiles import PROFILES
profile = PROFILES["smoke"]
for _ in range(int(sys.argv[1])):  # models built before it shift the names Keras numbers per process
    rotation_head(profile_encoder(profile).output_shape[-1], profile)
seed_weights(3)
print(encoder_fingerprint(profile_encoder(profile), context="images"))
"""


def test_the_same_seeded_encoder_has_the_same_key_in_another_process():
    """What lets the notebooks of a sweep, one process each, share a fresh encoder's features."""
    import subprocess
    import sys

    keys = [
        subprocess.run([sys.executable, "-c", FINGERPRINT_SCRIPT, str(built_before)], capture_output=True, text=True, check=True, timeout=300)
        .stdout.strip().splitlines()[-1]
        for built_before in (0, 2)
    ]
    assert len(keys[0]) == 24 and keys[0] == keys[1]
