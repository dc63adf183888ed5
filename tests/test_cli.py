"""nanowaltz/cli.py: one command-line convention for every script, a settings dataclass whose comments are --help."""
from dataclasses import dataclass

import pytest

import eval as evaluation
import infer
import rollout
import train
from nanowaltz.cli import build_parser, field_help, flag, parse


@dataclass
class Toy:
    size: int = 3  # how many
    rate: float | None = None  # a rate, 50% of the time
        # and a second line of help
    mode: str = "a"  # {a,b} which mode
    names: list | None = None  # a name (repeat the flag for several)
    loud: bool = False  # say more
    preset: str = ""  # 'big': size 9

    def __post_init__(self):
        if self.preset == "big":
            self.size = 9


def test_field_comments_become_help_with_continuation_lines():
    helps = field_help(Toy)
    assert helps["size"] == "how many"
    assert helps["rate"] == "a rate, 50% of the time and a second line of help"
    text = build_parser(Toy, "toy").format_help()
    assert "a second line of help" in text and "50% of the time" in text  # a bare % would break argparse


def test_types_choices_lists_and_booleans():
    toy = parse(Toy, "toy", ["--size", "5", "--rate", "0.5", "--mode", "b", "--names", "x", "--names", "y", "--loud"])
    assert (toy.size, toy.rate, toy.mode, toy.names, toy.loud) == (5, 0.5, "b", ["x", "y"], True)
    assert parse(Toy, "toy", []) == Toy()
    with pytest.raises(SystemExit):
        parse(Toy, "toy", ["--mode", "c"])  # not one of {a,b}
    with pytest.raises(SystemExit):
        parse(Toy, "toy", ["--size", "many"])


def test_a_preset_yields_to_flags_given_explicitly():
    assert parse(Toy, "toy", ["--preset", "big"], presets={"big": ("size",)}).size == 9
    assert parse(Toy, "toy", ["--preset", "big", "--size", "4"], presets={"big": ("size",)}).size == 4
    assert parse(Toy, "toy", ["--preset", "big", "--size=4"], presets={"big": ("size",)}).size == 4


def test_every_script_documents_every_flag():
    for settings in (train.Args, infer.InferArgs, evaluation.EvalArgs, rollout.ShowArgs):
        helps = field_help(settings)
        assert set(helps) == set(settings.__dataclass_fields__), settings.__name__
        assert all(text.strip() for text in helps.values())


def test_flag_names():
    assert flag("micro_batch_size") == "--micro-batch-size"
