"""faqd_tf.config: the schema, its ranges, overrides, the file reader and the shipped configs."""

import json
import os

import pytest

from faqd_tf import config, inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = {"dataset": {"source": "idx:x"}}


@pytest.mark.parametrize(
    "name", sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".json"))
)
def test_shipped_configs_resolve_by_path_and_by_name(name):
    by_path = config.load(os.path.join(ROOT, "configs", f"{name}.json"))
    assert by_path["dataset"]["source"]
    assert config.load(name) == by_path  # a shipped config, by name
    assert name in config.shipped_names()


def test_the_paper_configs_are_shipped():
    assert {"cifar10", "cifar100", "tiny_imagenet", "fashion_mnist", "quickstart"} <= set(
        config.shipped_names()
    )


def test_overrides_parse_json_and_strings():
    out = config.resolve(
        config.apply_overrides(
            SOURCE, ["train.epochs=5", "distill.fa=null", "dataset.source=tfds:cifar10"]
        )
    )
    assert (
        out["train"]["epochs"] == 5
        and out["distill"]["fa"] is None
        and out["dataset"]["source"] == "tfds:cifar10"
    )


def test_defaults_fill_in_and_keep_given_values():
    out = config.resolve({"dataset": {"source": "idx:x"}, "student": {"weight_bits": 2}})
    assert out["student"]["weight_bits"] == 2
    assert out["train"] == config.resolve_section("train", {})
    assert set(out) == set(config.SCHEMA)


@pytest.mark.parametrize(
    "section, key, value, words",
    [
        ("train", "lr", float("inf"), "a number > 0.0 and <= 10.0"),
        ("train", "lr", float("nan"), "train.lr=NaN is not valid"),
        ("train", "lr", 0, "a number > 0.0"),
        ("distill", "temperature", 1e-300, "a number >= 0.05 and <= 100.0"),
        ("distill", "alpha", float("-inf"), "distill.alpha=-Infinity"),
        ("train", "momentum", 1.5, "<= 1.0"),
        ("train", "epochs", 10**12, "an integer >= 1 and <= 100000"),
        ("train", "batch_size", 0, "an integer >= 1"),
        ("seed", None, 2**32, "seed=4294967296 is not valid"),
        ("dataset", "augment", "mixup", 'one of null, true, false, "crop"'),
        ("dataset", "image_size", [6000, 6000], "1 to 4096 pixels"),
        ("output_dir", None, "  ", "a non-empty string"),
        ("student", "relax_eta", 1.0, "> 1.0"),
    ],
)
def test_out_of_range_values_name_the_key_and_the_range(section, key, value, words):
    raw = json.loads(json.dumps(SOURCE))
    if key is None:
        raw[section] = value
    else:
        raw.setdefault(section, {})[key] = value
    with pytest.raises(config.ConfigError) as excinfo:
        config.resolve(raw)
    message = str(excinfo.value)
    assert words in message and "\n" not in message, message


def test_values_in_messages_are_shortened():
    with pytest.raises(config.ConfigError) as excinfo:
        config.resolve({"dataset": {"source": "idx:x", "labels": "y" * 100_000}})
    message = str(excinfo.value)
    assert "dataset.labels=" in message and "100,002 characters" in message and len(message) < 300


def test_set_onto_a_value_that_is_not_an_object():
    with pytest.raises(config.ConfigError, match=r"'train' is 5 in the config file, not an object"):
        config.apply_overrides({"dataset": {"source": "idx:x"}, "train": 5}, ["train.epochs=1"])
    with pytest.raises(config.ConfigError, match=r"must be a JSON object, got \[1, 2\]"):
        config.apply_overrides([1, 2], ["train.epochs=1"])


@pytest.mark.parametrize(
    "text, words",
    [
        (
            '{"dataset": {"source": "idx:x"}, "seed": ' + "9" * 5000 + "}",
            "seed=<an integer of 5,000 digits> is not valid",
        ),
        ("[" * 50_000 + "]" * 50_000, "nests lists and objects deeper than 32 levels"),
        (
            '{"dataset": {"source": "idx:x"}, "output_dir": "caf\xe9"}',
            "is not UTF-8 text (byte 0xe9 on line 1)",
        ),
    ],
)
def test_hostile_config_files_name_the_file(tmp_path, text, words):
    path = tmp_path / "c.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(config.ConfigError) as excinfo:
        config.load(str(path))
    message = str(excinfo.value)
    assert words in message and "\n" not in message and len(message) < 400, message
    if "seed" not in words:
        assert str(path) in message


def test_long_integer_in_set_names_the_key():
    with pytest.raises(
        config.ConfigError, match=r"train.epochs=<an integer of 5,000 digits> is not valid"
    ):
        config.resolve(config.apply_overrides(SOURCE, ["train.epochs=" + "1" * 5000]))


def test_config_file_size_is_bounded(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps({**SOURCE, "output_dir": "x" * (2 * 2**20)}))
    with pytest.raises(
        config.ConfigError, match=r"big.json is 2.0 MiB, more than the 1.0 MiB it may be"
    ):
        config.load(str(path))


def test_a_long_config_path_is_named_whole(tmp_path):
    # Real paths often pass 80 characters; the message must still name the file a user gave.
    folder = tmp_path / ("deeply_nested_" * 3).strip("_") / ("experiment_" * 2).strip("_")
    folder.mkdir(parents=True)
    path = folder / "config.json"
    path.write_text('{"seed": 1, "seed": 2}')
    assert len(str(path)) > inputs.MESSAGE_CHARS
    with pytest.raises(config.ConfigError) as info:
        config.load(str(path))
    assert f"config file {path} gives the key 'seed' twice" in str(info.value)


def test_the_config_docs_are_the_records():
    """docs/config.md lists every key with its default, range and doc, as the option records give them."""
    with open(os.path.join(ROOT, "docs", "config.md")) as f:
        assert f.read() == config.markdown(), (
            "docs/config.md is stale; regenerate it: "
            "python -c \"from faqd_tf import config; print(config.markdown(), end='')\" > docs/config.md"
        )
    keys = [line.split("`")[1] for line in config.markdown().splitlines() if line.startswith("| `")]

    def flat(schema, prefix=""):
        for name, spec in schema.items():
            key = f"{prefix}{name}"
            yield from flat(spec, key + ".") if isinstance(spec, dict) else [key]

    assert keys == list(flat(config.SCHEMA))
