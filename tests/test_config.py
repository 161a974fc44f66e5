"""Settings (config.py) and the command line's flags (flags.py): impossible settings refused before any
data is read, real booleans, a config's JSON round trip."""
import json

import pytest

from config import TrainConfig
from flags import parse_args


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "sst,nope"], "unknown task"),
    (["--option", "test"], "needs --pretrained_model_name"),
    (["--batch_size", "0"], "must be >= 1"),
    (["--encoder_dropout", "1"], "--encoder_dropout must be in [0, 1)"),
    (["--ema_decay", "1"], "--ema_decay must be in [0, 1)"),
    (["--option", "pretrain", "--sts_head", "cosine"], "nothing to train"),
    (["--layer_lr_decay", "0"], "--layer_lr_decay must be in (0, 1]"),
    (["--clip", "0"], "--clip must be > 0 or none"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),  # nan passes `lr <= 0`
    (["--smart_eps", "inf"], "--smart_eps must be a finite number, got inf"),
    (["--resume", "runs/x", "--lr", "5"], "these would be ignored: --lr"),
    (["--option", "test", "--pretrained_model_name", "runs/x", "--save_path", "t"], "would be ignored: --save_path"),
    (["--option", "test", "--pretrained_model_name", "runs/x", "--tasks", "sst"], "would be ignored: --tasks"),
    (["--option", "ensemble", "--ensemble", "a", "b", "--lr", "5"], "would be ignored: --lr"),
    (["--resume", "runs/x", "--seed", "11711"], "would be ignored: --seed"),  # the default value, named
    (["--ensemble_method", "vote"], "--ensemble_method is read only by --option ensemble"),
    (["--option", "ensemble", "--ensemble", "runs/a", "runs/b", "runs/a"], "--ensemble names a run twice"),
    (["--option", "individual_pretrain", "--profile", "3"], "--profile profiles the multitask training loop"),
    (["--lr", "1e38"], "--lr and --head_lr must be in (0, 1]"),  # was an overflow traceback in the optimiser
])
def test_impossible_settings_are_rejected_before_training(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_boolean_flags_are_real_booleans():
    assert parse_args(["--class_weights"]).class_weights is True
    assert parse_args(["--no-class_weights"]).class_weights is False
    assert parse_args(["--clip", "none"]).clip is None


def test_config_round_trips_through_json():
    cfg = parse_args(["--lr", "3e-5", "--tasks", "sst,sts"])
    assert TrainConfig(**json.loads(json.dumps(cfg.__dict__))) == cfg
